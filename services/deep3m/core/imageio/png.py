"""PNG slices: 8- and 16-bit grayscale, palette images read as raw indices (labels)."""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

from deep3m.core.errors import InvalidArgumentError, NotFoundError
from deep3m.core.imageio.locations import Location
from deep3m.core.imageio.source import SliceHeader

PNG_SUFFIXES = (".png",)
# EM slices are large by design; Pillow's default guards against image bombs
# from untrusted web content would refuse a 20k x 20k section.
_MAX_PIXELS = 2**32
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < _MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = _MAX_PIXELS


_PNG_MODES: dict[str, str] = {
    "L": "uint8",
    "P": "uint8",
    "1": "uint8",
    "I;16": "uint16",
    "I;16B": "uint16",
    "I;16L": "uint16",
    # Pillow may open 16-bit grayscale PNGs as 32-bit "I"; PNG holds at most 16 bits.
    "I": "uint16",
}


def png_header(loc: Location, *, verify: bool) -> SliceHeader:
    try:
        with loc.open_bytes() as fh, Image.open(fh) as im:
            mode, (width, height) = im.mode, im.size
            fmt = im.format
            if verify:
                # Reads every chunk and checks its CRC: finds truncated or damaged files.
                im.verify()
    except FileNotFoundError as exc:
        raise NotFoundError(f"{loc.display} does not exist", field=loc.display) from exc
    except UnidentifiedImageError as exc:
        raise InvalidArgumentError(
            f"{loc.display} is not a readable image file", field=loc.display
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidArgumentError(
            f"{loc.display} is corrupt or truncated: {exc}", field=loc.display
        ) from exc
    if fmt != "PNG":
        raise InvalidArgumentError(f"{loc.display} is a {fmt} file, not PNG", field=loc.display)
    if mode in ("F", "I;16S", "I;32F"):
        raise InvalidArgumentError(
            f"{loc.display}: floating point or signed images (mode {mode}) are not supported",
            field=loc.display,
        )
    if mode not in _PNG_MODES:
        raise InvalidArgumentError(
            f"{loc.display} is a {mode} image ({len(mode)} channels); deep3m needs "
            "single-channel grayscale (or palette/label) images",
            field=loc.display,
        )
    return SliceHeader((height, width), np.dtype(_PNG_MODES[mode]))


def read_png(loc: Location, header: SliceHeader) -> np.ndarray:
    try:
        with loc.open_bytes() as fh, Image.open(fh) as im:
            mode = im.mode
            # Palette images: np.asarray gives the raw indices, never RGB.
            data = np.asarray(im)
    except FileNotFoundError as exc:
        raise NotFoundError(f"{loc.display} does not exist", field=loc.display) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidArgumentError(
            f"{loc.display} is corrupt or truncated: {exc}", field=loc.display
        ) from exc
    dtype = _PNG_MODES.get(mode)
    if dtype is None or np.dtype(dtype) != header.dtype:
        raise InvalidArgumentError(
            f"{loc.display} is a {mode} image but the stack is {header.dtype.name}: all slices "
            "must have the same type",
            field=loc.display,
        )
    if data.shape != header.shape:
        raise InvalidArgumentError(
            f"{loc.display} has size {data.shape[1]}x{data.shape[0]} (x by y) but the stack is "
            f"{header.shape[1]}x{header.shape[0]}: all slices must be the same size",
            field=loc.display,
        )
    return data.astype(header.dtype, copy=False)
