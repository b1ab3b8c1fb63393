"""Where an image source lives: a local path, or a ``file://``, ``s3://`` or ``memory://`` URL."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import fsspec

from deep3m.core.errors import InvalidArgumentError


@dataclass(frozen=True)
class Location:
    """A file or folder, local or behind an fsspec URL."""

    fs: Any
    path: str
    display: str

    @property
    def local(self) -> bool:
        return "file" in protocols(self.fs)

    def open_bytes(self, *, whole: bool = True) -> BinaryIO:
        """A binary file; remote ones are fetched whole (one request per slice
        file) unless ``whole`` is off (multi-page TIFFs: ranged reads of the pages)."""
        if self.local:
            return open(self.path, "rb")
        if whole:
            return io.BytesIO(self.fs.cat_file(self.path))
        return self.fs.open(self.path, "rb")  # type: ignore[no-any-return]

    def child(self, name: str) -> Location:
        sep = "" if self.display.endswith("/") else "/"
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.display}{sep}{name}")


def protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def locate(source: str, storage_options: Mapping[str, Any] | None) -> Location:
    if "://" in source:
        scheme = urlparse(source).scheme
        if scheme not in ("file", "s3", "memory"):
            raise InvalidArgumentError(
                f"unsupported source URL scheme {scheme!r} in {source!r}", field="source"
            )
        options = dict(storage_options or {}) if scheme == "s3" else {}
        fs, path = fsspec.core.url_to_fs(source, **options)
        if scheme == "file":
            return Location(fs, str(Path(path).resolve()), source)
        return Location(fs, path.rstrip("/"), source)
    fs = fsspec.filesystem("file")
    return Location(fs, str(Path(source).expanduser().resolve()), source)
