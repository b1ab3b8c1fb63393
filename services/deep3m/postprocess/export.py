"""Exports: a volume as a TIFF stack or PNG pages, and overlay PNGs for a quick look.

Pages are read one z-slice at a time, so volumes larger than memory export
fine. Pixel types that TIFF/PNG readers handle poorly are converted first:
probabilities (floating point, or ``kind: probabilities``) become 8-bit
0..255 as CDeep3M writes them; label ids become 16-bit when they fit (larger
ids are refused rather than wrapped). Destinations are local folders (or
``file://`` URLs); ``s3://`` and ``memory://`` destinations are written through
a local temporary folder and uploaded.
"""

from __future__ import annotations

import colorsys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import fsspec
import numpy as np
from PIL import Image

from deep3m.core.errors import AlreadyExistsError, InvalidArgumentError, clip
from deep3m.core.imageio import export_png, export_tiff
from deep3m.core.store import Store
from deep3m.postprocess.foreground import Kind, volume_kind

Format = Literal["tiff", "png"]
FORMATS: tuple[str, ...] = ("tiff", "png", "overlay")
_TIFF_SUFFIXES = (".tif", ".tiff")


class PageView:
    """A (z, y, x) array seen as 8/16-bit pages, converted one slice at a time."""

    def __init__(self, array: Any, kind: Kind, *, max_label: int | None = None) -> None:
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        src = np.dtype(array.dtype)
        self.kind = kind
        self.dtype: np.dtype[Any]
        if kind == "probability":
            self.dtype = np.dtype(np.uint8)
        elif src.kind in "ui" and src.itemsize > 2:
            top = max_label if max_label is not None else _max_value(array)
            if top > np.iinfo(np.uint16).max or (src.kind == "i" and _min_value(array) < 0):
                raise InvalidArgumentError(
                    f"values up to {top} do not fit 16-bit pages; export a label volume with "
                    "fewer objects or a crop",
                    field="volume",
                )
            self.dtype = np.dtype(np.uint16)
        else:
            self.dtype = src

    def __getitem__(self, z: int) -> np.ndarray:
        page = np.asarray(self.array[z])
        if self.kind == "probability":
            if np.issubdtype(page.dtype, np.integer):
                return page.astype(np.uint8) if page.dtype == np.uint8 else _rescale_int(page)
            return np.rint(np.clip(page, 0.0, 1.0) * 255.0).astype(np.uint8)
        return page.astype(self.dtype, copy=False)


def _rescale_int(page: np.ndarray) -> np.ndarray:
    top = float(np.iinfo(page.dtype).max)
    return np.rint(page.astype(np.float64) * (255.0 / top)).astype(np.uint8)


def _max_value(array: Any) -> int:
    return max(int(np.asarray(array[z]).max()) for z in range(array.shape[0]))


def _min_value(array: Any) -> int:
    return min(int(np.asarray(array[z]).min()) for z in range(array.shape[0]))


def _is_remote(destination: str) -> bool:
    return "://" in destination and not destination.startswith("file://")


def _local(destination: str) -> Path:
    return Path(destination.removeprefix("file://")).expanduser()


def refuse_existing(
    destination: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    field: str = "destination",
    hint: str = "set overwrite to replace it",
) -> None:
    """AlreadyExistsError when ``destination`` is a file or a folder with anything in
    it: an export replaces what is there only when asked (an empty folder is free)."""
    if _is_remote(destination):
        fs, path = fsspec.core.url_to_fs(destination, **dict(storage_options or {}))
    else:
        fs, path = fsspec.filesystem("file"), str(_local(destination))
    if not fs.exists(path):
        return
    if fs.isdir(path) and not fs.ls(path, detail=False):
        return
    raise AlreadyExistsError(f"{field} {clip(destination)} already exists; {hint}", field=field)


def _deliver(
    local_files: Sequence[Path], local_root: Path, destination: str,
    storage_options: Mapping[str, Any] | None,
) -> list[str]:  # fmt: skip
    fs, root = fsspec.core.url_to_fs(destination, **dict(storage_options or {}))
    root = root.rstrip("/")
    out = []
    for path in local_files:
        rel = path.relative_to(local_root).as_posix()
        fs.put_file(str(path), f"{root}/{rel}")
        out.append(f"{destination.rstrip('/')}/{rel}")
    return out


def _export_local(view: PageView, fmt: Format, target: Path, name: str) -> list[Path]:
    if fmt == "tiff":
        file = target if target.suffix.lower() in _TIFF_SUFFIXES else target / f"{name}.tif"
        return [export_tiff(view, file)]
    return export_png(view, target, prefix=name)


def export_array(
    array: Any,
    destination: str,
    fmt: str,
    *,
    kind: Kind | None = None,
    name: str = "volume",
    max_label: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write ``array`` to ``destination`` as ``tiff`` (one multi-page file) or ``png``
    (a page per slice); returns the written files."""
    if fmt not in ("tiff", "png"):
        raise InvalidArgumentError(f"format must be tiff or png, got {fmt!r}", field="format")
    if not destination:
        raise InvalidArgumentError("destination is empty", field="destination")
    view = PageView(array, kind or volume_kind(array.dtype), max_label=max_label)
    chosen: Format = "tiff" if fmt == "tiff" else "png"
    if not _is_remote(destination):
        return [str(p) for p in _export_local(view, chosen, _local(destination), name)]
    with tempfile.TemporaryDirectory(prefix="deep3m-export-") as tmp:
        root = Path(tmp)
        target = (
            root / Path(destination).name if destination.lower().endswith(_TIFF_SUFFIXES) else root
        )
        files = _export_local(view, chosen, target, name)
        remote = destination if target == root else destination.rsplit("/", 1)[0]
        return _deliver(files, root, remote, storage_options)


# -- overlays -----------------------------------------------------------------------
def label_colors(labels: np.ndarray) -> np.ndarray:
    """A stable, distinct RGB colour per label id (golden-ratio hues); (..., 3) uint8."""
    hue = (labels.astype(np.float64) * 0.618033988749895) % 1.0
    table = np.array(
        [colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in np.linspace(0, 1, 256, endpoint=False)]
    )
    return np.asarray(np.rint(table[(hue * 256).astype(np.int64) % 256] * 255), np.uint8)


def gray_page(page: np.ndarray) -> np.ndarray:
    if page.dtype == np.uint8:
        return page
    data = page.astype(np.float64)
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros(page.shape, np.uint8)
    return np.rint((data - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def overlay_page(
    image: np.ndarray, overlay: np.ndarray, kind: Kind, *, alpha: float = 0.5
) -> np.ndarray:
    """An RGB page: the image in gray, probabilities in red (opacity grows with the
    probability), labels in per-object colours."""
    gray = gray_page(image).astype(np.float64)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    if kind == "probability":
        prob = overlay.astype(np.float64)
        if np.issubdtype(overlay.dtype, np.integer):
            prob = prob / float(np.iinfo(overlay.dtype).max)
        weight = (alpha * np.clip(prob, 0.0, 1.0))[..., None]
        color = np.array([255.0, 0.0, 0.0])
        rgb = rgb * (1 - weight) + color * weight
    else:
        mask = overlay != 0
        colors = label_colors(overlay).astype(np.float64)
        rgb[mask] = rgb[mask] * (1 - alpha) + colors[mask] * alpha
    return np.asarray(np.rint(rgb), np.uint8)


def page_indices(shape: Sequence[int], slices: Sequence[int] | None) -> Iterator[int]:
    chosen = list(range(shape[0])) if not slices else [int(z) for z in slices]
    for z in chosen:
        if not 0 <= z < shape[0]:
            raise InvalidArgumentError(f"slice {z} lies outside 0..{shape[0] - 1}", field="slices")
    yield from chosen


def export_overlay(
    image: Any,
    overlay: Any,
    destination: str,
    *,
    kind: Kind | None = None,
    slices: Sequence[int] | None = None,
    alpha: float = 0.5,
    prefix: str = "overlay",
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """RGB PNGs of ``overlay`` (probabilities or labels) over ``image``, one per slice."""
    if tuple(image.shape) != tuple(overlay.shape):
        raise InvalidArgumentError(
            f"overlay shape {tuple(overlay.shape)} differs from image shape {tuple(image.shape)}",
            field="image",
        )
    if not 0.0 < alpha <= 1.0:
        raise InvalidArgumentError(f"alpha must lie in (0, 1], got {alpha}", field="alpha")
    chosen_kind = kind or volume_kind(overlay.dtype)

    def render(z: int) -> np.ndarray:
        return overlay_page(np.asarray(image[z]), np.asarray(overlay[z]), chosen_kind, alpha=alpha)

    return write_png_pages(
        render, page_indices(image.shape, slices), image.shape[0], destination,
        prefix=prefix, storage_options=storage_options,
    )  # fmt: skip


def write_png_pages(
    render: Callable[[int], np.ndarray],
    pages: Iterable[int],
    depth: int,
    destination: str,
    *,
    prefix: str,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """``<prefix>_<z>.png`` for each page ``z`` (``render(z)`` gives its RGB array), in a
    local folder or a remote one (``s3://…``); returns what was written."""
    chosen = list(pages)
    digits = max(4, len(str(depth - 1)))

    def write(folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for z in chosen:
            path = folder / f"{prefix}_{z:0{digits}d}.png"
            tmp = path.with_name(path.name + ".tmp")
            Image.fromarray(render(z)).save(tmp, format="PNG")
            tmp.replace(path)
            out.append(path)
        return out

    if not _is_remote(destination):
        return [str(p) for p in write(_local(destination))]
    with tempfile.TemporaryDirectory(prefix="deep3m-overlay-") as tmp:
        return _deliver(write(Path(tmp)), Path(tmp), destination, storage_options)


def volume_name(path: str) -> str:
    """``volumes/mito.zarr/labels/segmentation`` → ``segmentation``; ``mito.zarr`` → ``mito``."""
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return last.removesuffix(".zarr") or "volume"


class SliceView:
    """The chosen z-slices of an array, read lazily one slice at a time."""

    def __init__(self, array: Any, slices: Sequence[int]) -> None:
        depth = int(array.shape[0])
        for z in slices:
            if not 0 <= z < depth:
                raise InvalidArgumentError(f"slice {z} lies outside 0..{depth - 1}", field="slices")
        self.array = array
        self.slices = list(slices)
        self.dtype = array.dtype
        self.shape = (len(self.slices), *(int(s) for s in array.shape[1:]))

    def __getitem__(self, z: int) -> Any:
        return self.array[self.slices[z]]


def export_volume(
    store: Store,
    path: str,
    destination: str,
    fmt: str,
    *,
    array: str = "",
    slices: Sequence[int] = (),
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """``export_array`` for a stored (complete) volume: all of it, or the z-``slices``
    chosen, in that order."""
    info = store.volume_info(path, array)
    data = store.open_volume(path, array)
    count = info.attributes.get("object_count")
    return export_array(
        SliceView(data, slices) if slices else data, destination, fmt,
        kind=volume_kind(info.dtype, info.attributes), name=volume_name(path),
        max_label=int(count) if isinstance(count, int) else None,
        storage_options=storage_options,
    )  # fmt: skip
