"""A folder (or list) of single-page PNG or TIFF files, one slice per file."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deep3m.core.errors import InvalidArgumentError, NotFoundError
from deep3m.core.executor import bounded_map
from deep3m.core.imageio.locations import Location
from deep3m.core.imageio.png import PNG_SUFFIXES, png_header, read_png
from deep3m.core.imageio.source import ImageSource, SliceHeader, check_same_size, natural_key
from deep3m.core.imageio.tiff import TIFF_SUFFIXES, read_tiff_pages, tiff_headers


class PageFolderSource(ImageSource):
    """A folder (or list) of single-page TIFF or PNG files, one per slice.

    ``verify`` checks every file's header (and PNG checksums) now; without it
    only the first file is checked now and each other one when it is read.
    """

    def __init__(
        self,
        display: str,
        files: Sequence[Location],
        kind: str,
        *,
        verify: bool = True,
        workers: int = 4,
    ) -> None:
        self.description = display
        self._files = tuple(files)
        self._kind = kind
        to_check = self._files if verify else self._files[:1]
        found = bounded_map(
            lambda f: self._header_of(f, verify),
            to_check,
            min(workers, len(to_check)),
            thread_name_prefix="headers",
        )
        headers = [header for _, header in sorted(found, key=lambda item: item[0])]
        self._header = check_same_size(headers, [f.display for f in to_check])
        self.shape = (len(self._files), *self._header.shape)
        self.dtype = self._header.dtype

    def _header_of(self, loc: Location, verify: bool) -> SliceHeader:
        if self._kind == "png":
            return png_header(loc, verify=verify)
        pages = tiff_headers(loc)
        if len(pages) != 1:
            raise InvalidArgumentError(
                f"{loc.display} has {len(pages)} pages; a folder of TIFF files must hold one "
                "slice per file",
                field=loc.display,
            )
        return pages[0]

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f.display for f in self._files)

    def _read(self, z_start: int, z_stop: int) -> np.ndarray:
        out = np.empty((z_stop - z_start, *self.shape[1:]), dtype=self.dtype)
        for i, loc in enumerate(self._files[z_start:z_stop]):
            if self._kind == "png":
                out[i] = read_png(loc, self._header)
                continue
            check_same_size(
                [self._header, self._header_of(loc, False)], [self._files[0].display, loc.display]
            )
            out[i] = read_tiff_pages(loc, range(1))[0]
        return out


def folder_source(loc: Location, *, verify: bool, workers: int) -> PageFolderSource:
    try:
        entries = loc.fs.ls(loc.path, detail=True)
    except FileNotFoundError as exc:
        raise NotFoundError(f"folder {loc.display} does not exist", field=loc.display) from exc
    names = sorted(
        (str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"),
        key=natural_key,
    )
    names = [n for n in names if not n.startswith(".")]
    pngs = [n for n in names if n.lower().endswith(PNG_SUFFIXES)]
    tiffs = [n for n in names if n.lower().endswith(TIFF_SUFFIXES)]
    if pngs and tiffs:
        raise InvalidArgumentError(
            f"folder {loc.display} mixes PNG ({pngs[0]}, ...) and TIFF ({tiffs[0]}, ...) "
            "files; keep one kind per stack",
            field=loc.display,
        )
    if not pngs and not tiffs:
        others = (
            f" (it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            if names
            else ""
        )
        raise InvalidArgumentError(
            f"folder {loc.display} contains no PNG or TIFF images{others}", field=loc.display
        )
    kind = "png" if pngs else "tiff"
    files = [loc.child(n) for n in (pngs or tiffs)]
    return PageFolderSource(loc.display, files, kind, verify=verify, workers=workers)
