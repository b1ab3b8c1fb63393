"""What every image source is: a stack of 2D slices with a shape, a pixel type and ``read``."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deep3m.core.errors import InvalidArgumentError

SUPPORTED_DTYPES = ("uint8", "uint16", "int8", "int16")
Shape3 = tuple[int, int, int]


def check_dtype(dtype: np.dtype[Any] | str, where: str) -> np.dtype[Any]:
    """Normalise and check a pixel type; refuses float, complex, 32-bit and wider."""
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return np.dtype(np.uint8)
    native = dt.newbyteorder("=")
    if native.name in SUPPORTED_DTYPES:
        return native
    if dt.kind in "fc":
        raise InvalidArgumentError(
            f"{where}: {dt.name} (floating point) images are not supported; convert to "
            "8- or 16-bit integers",
            field=where,
        )
    raise InvalidArgumentError(
        f"{where}: pixel type {dt.name} is not supported; use 8- or 16-bit grayscale "
        f"({', '.join(SUPPORTED_DTYPES)})",
        field=where,
    )


def natural_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key with numbers compared by value, so ``img2`` comes before ``img10``."""
    parts = re.split(r"(\d+)", name)
    key = [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p]
    return (*key, (2, 0, name))


class ImageSource(ABC):
    """A lazily read stack of 2D slices; ``read`` is safe to call from many threads."""

    description: str
    shape: Shape3
    dtype: np.dtype[Any]
    #: Voxel size (z, y, x) from the file's metadata, when it records one.
    voxel_size_nm: tuple[float, float, float] | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def check_range(self, z_start: int, z_stop: int) -> None:
        if not 0 <= z_start < z_stop <= self.shape[0]:
            raise InvalidArgumentError(
                f"slice range [{z_start}, {z_stop}) is outside 0..{self.shape[0]} of "
                f"{self.description}",
                field="z_range",
            )

    def read(self, z_start: int, z_stop: int) -> np.ndarray:
        """Slices ``[z_start, z_stop)`` as a (z, y, x) array of ``dtype``."""
        self.check_range(z_start, z_stop)
        out = self._read(z_start, z_stop)
        expected = (z_stop - z_start, self.shape[1], self.shape[2])
        if out.shape != expected or out.dtype != self.dtype:
            raise InvalidArgumentError(
                f"{self.description}: slices {z_start}..{z_stop} read as {out.shape} "
                f"{out.dtype}, expected {expected} {self.dtype} (changed since it was opened?)",
                field="source",
            )
        return out

    @abstractmethod
    def _read(self, z_start: int, z_stop: int) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 - most sources hold no open handles
        """Release open handles (memory maps); reading after close is not allowed."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.description!r}, shape={self.shape}, dtype={self.dtype})"
        )


@dataclass(frozen=True)
class SliceHeader:
    shape: tuple[int, int]
    dtype: np.dtype[Any]


def check_same_size(headers: Sequence[SliceHeader], names: Sequence[str]) -> SliceHeader:
    first = headers[0]
    for header, name in zip(headers, names, strict=True):
        if header.shape != first.shape:
            raise InvalidArgumentError(
                f"{name} has size {header.shape[1]}x{header.shape[0]} (x by y) but "
                f"{names[0]} has {first.shape[1]}x{first.shape[0]}: all slices must be the "
                "same size",
                field=name,
            )
        if header.dtype != first.dtype:
            raise InvalidArgumentError(
                f"{name} has pixel type {header.dtype.name} but {names[0]} has "
                f"{first.dtype.name}: all slices must have the same type",
                field=name,
            )
    return first
