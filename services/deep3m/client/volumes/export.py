"""A volume's slices written out: TIFF stacks, PNG pages, overlays over an image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from deep3m.client.volumes.refs import jsonable, renamed
from deep3m.core.errors import Deep3mError, InvalidArgumentError
from deep3m.core.store import Store

# Slices exported or overlaid per run are listed, so keep a ceiling on typos like 0-99999.
MAX_SLICES = 100_000


def parse_slices(text: str) -> list[int]:
    """``"0,4,10-12"`` → [0, 4, 10, 11, 12] (ranges inclusive); empty → []."""
    chosen: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        try:
            start = int(lo)
            stop = int(hi) if dash else start
        except ValueError:
            raise InvalidArgumentError(
                f"--slices must be z indices or ranges like 0,4,10-12; got {part!r}",
                field="slices",
            ) from None
        if start < 0 or stop < start:
            raise InvalidArgumentError(
                f"--slices range {part!r} must run from a smaller to a larger index >= 0",
                field="slices",
            )
        chosen.extend(range(start, stop + 1))
        if len(chosen) > MAX_SLICES:
            raise InvalidArgumentError(
                f"--slices selects more than {MAX_SLICES} slices", field="slices"
            )
    return list(dict.fromkeys(chosen))


def export(
    store: Store,
    path: str,
    destination: str,
    fmt: str,
    *,
    array: str = "",
    image: tuple[Store, str] | None = None,
    slices: Sequence[int] = (),
    alpha: float = 0.5,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a volume as a TIFF stack or PNG pages, or overlay PNGs over ``image``;
    an existing destination (a file, or a folder that is not empty) only with ``overwrite``."""
    from deep3m.postprocess.export import (
        FORMATS,
        export_overlay,
        export_volume,
        refuse_existing,
        volume_name,
    )
    from deep3m.postprocess.foreground import volume_kind

    if fmt not in FORMATS:
        raise InvalidArgumentError(
            f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}", field="format"
        )
    if fmt == "overlay" and image is None:
        raise InvalidArgumentError(
            "--format overlay needs --image VOLUME (the image to draw over)", field="image"
        )
    if fmt != "overlay" and image is not None:
        raise InvalidArgumentError(
            f"--image is only used with --format overlay, not {fmt}", field="image"
        )
    # A missing or incomplete volume is refused before the destination is looked at.
    info = store.volume_info(path, array)
    data = store.open_volume(path, array)
    if not overwrite:
        refuse_existing(
            destination, storage_options=storage_options, hint="--overwrite replaces it"
        )
    if image is not None:
        try:
            image_data = image[0].open_volume(image[1])
        except Deep3mError as exc:
            raise renamed(exc, "image") from exc
        files = export_overlay(
            image_data, data, destination,
            kind=volume_kind(info.dtype, info.attributes), slices=list(slices) or None,
            alpha=alpha, prefix=volume_name(path), storage_options=storage_options,
        )  # fmt: skip
    else:
        files = export_volume(
            store, path, destination, fmt,
            array=array, slices=slices, storage_options=storage_options,
        )  # fmt: skip
    return jsonable(  # type: ignore[no-any-return]
        {
            "volume": path,
            "url": store.key_url(path),
            "format": fmt,
            "destination": destination,
            "slices": list(slices) or None,
            "files": [str(f) for f in files],
        }
    )
