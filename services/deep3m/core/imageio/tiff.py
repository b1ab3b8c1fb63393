"""TIFF: multi-page stacks, and the page checks shared with folders of single-page files.

tifffile logs, rather than raises, on broken page chains, so its log records for
the reading thread are collected and turned into errors naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np
import tifffile

from deep3m.core.errors import Deep3mError, InvalidArgumentError, NotFoundError
from deep3m.core.imageio.locations import Location
from deep3m.core.imageio.source import ImageSource, SliceHeader, check_dtype, check_same_size

TIFF_SUFFIXES = (".tif", ".tiff")


class _TiffLogCapture(logging.Handler):
    """Collects tifffile's complaints about the file being read by this thread.

    tifffile logs, rather than raises, on broken page chains (a truncated
    multi-page file looks like a shorter stack otherwise).
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tiff_problems() -> Iterator[list[str]]:
    handler = _TiffLogCapture()
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _tiff_page_header(page: Any, where: str) -> SliceHeader:
    if int(getattr(page, "samplesperpixel", 1)) > 1:
        raise InvalidArgumentError(
            f"{where} has {page.samplesperpixel} samples per pixel (RGB/RGBA?); deep3m needs "
            "single-channel grayscale images",
            field=where,
        )
    shape = tuple(int(s) for s in page.shape)
    if len(shape) != 2:
        raise InvalidArgumentError(
            f"{where} has a {len(shape)}D page {shape}; expected 2D", field=where
        )
    dtype = check_dtype(page.dtype, where)
    return SliceHeader((shape[0], shape[1]), dtype)


def _tiff_data_within(page: Any, file_size: int, where: str) -> None:
    for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False):
        if int(offset) + int(count) > file_size:
            raise InvalidArgumentError(
                f"{where} is truncated: image data ends at byte {int(offset) + int(count)} but "
                f"the file has {file_size} bytes",
                field=where,
            )


def _file_size(fh: BinaryIO) -> int:
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(0)
    return size


def tiff_headers(loc: Location) -> list[SliceHeader]:
    """Validate every page header of a TIFF file; one header per page."""
    try:
        with loc.open_bytes(whole=False) as fh, _tiff_problems() as problems:
            size = _file_size(fh)
            with tifffile.TiffFile(fh) as tf:
                pages = list(tf.pages)
                headers = []
                for i, page in enumerate(pages):
                    where = loc.display if len(pages) == 1 else f"{loc.display} (page {i})"
                    headers.append(_tiff_page_header(page, where))
                    _tiff_data_within(page, size, where)
                series = tf.series[0] if tf.series else None
                if series is not None and len(tf.series) == 1:
                    axes = dict(zip(series.axes, series.shape, strict=True))
                    if axes.get("C", 1) > 1 or axes.get("S", 1) > 1:
                        raise InvalidArgumentError(
                            f"{loc.display} has {axes.get('C', axes.get('S'))} channels; "
                            "deep3m needs a single-channel stack",
                            field=loc.display,
                        )
                    planes = int(np.prod([n for a, n in axes.items() if a not in "YX"]))
                    if planes != len(pages) and (tf.is_shaped or tf.is_imagej):
                        raise InvalidArgumentError(
                            f"{loc.display} is truncated: its metadata describes {planes} pages "
                            f"but only {len(pages)} can be read",
                            field=loc.display,
                        )
    except FileNotFoundError as exc:
        raise NotFoundError(f"{loc.display} does not exist", field=loc.display) from exc
    except Deep3mError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, KeyError, IndexError) as exc:
        raise InvalidArgumentError(
            f"{loc.display} is not a readable TIFF file: {exc}", field=loc.display
        ) from exc
    if problems:
        raise InvalidArgumentError(
            f"{loc.display} is corrupt or truncated: {problems[0]}", field=loc.display
        )
    if not headers:
        raise InvalidArgumentError(f"{loc.display} contains no images", field=loc.display)
    return headers


def read_tiff_pages(loc: Location, pages: range) -> np.ndarray:
    try:
        with loc.open_bytes(whole=False) as fh, tifffile.TiffFile(fh) as tf:
            return np.stack([tf.pages[i].asarray() for i in pages])  # type: ignore[union-attr]
    except FileNotFoundError as exc:
        raise NotFoundError(f"{loc.display} does not exist", field=loc.display) from exc
    except (tifffile.TiffFileError, ValueError, OSError, KeyError, IndexError) as exc:
        raise InvalidArgumentError(
            f"{loc.display} is corrupt or truncated: {exc}", field=loc.display
        ) from exc


class TiffStackSource(ImageSource):
    """A multi-page TIFF file: page i is slice z = i."""

    def __init__(self, loc: Location) -> None:
        self._loc = loc
        self.description = loc.display
        headers = tiff_headers(loc)
        names = [f"{loc.display} (page {i})" for i in range(len(headers))]
        first = check_same_size(headers, names)
        self.shape = (len(headers), *first.shape)
        self.dtype = first.dtype

    def _read(self, z_start: int, z_stop: int) -> np.ndarray:
        return read_tiff_pages(self._loc, range(z_start, z_stop)).astype(self.dtype, copy=False)
