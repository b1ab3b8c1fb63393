"""Store URLs and the keys inside a store."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from deep3m.core.errors import InvalidArgumentError

SUPPORTED_SCHEMES = ("file", "s3", "memory")


def url_scheme(url: str) -> str:
    """The scheme of a store URL; a plain path is ``file``."""
    return urlparse(url).scheme if "://" in url else "file"


def normalize_url(url: str) -> str:
    """Canonical form of a store URL: scheme, no trailing slash, absolute files."""
    if "://" not in url:
        url = "file://" + url
    scheme = url_scheme(url)
    if scheme not in SUPPORTED_SCHEMES:
        raise InvalidArgumentError(
            f"unsupported store URL scheme {scheme!r} in {url!r}; "
            f"use one of {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}",
            field="store_url",
        )
    if scheme == "file":
        local = url[len("file://") :]
        return "file://" + str(Path(local).expanduser().resolve())
    return url.rstrip("/")


def check_key(key: str) -> str:
    """A relative key inside the store: no absolute paths, no ``..`` escapes."""
    if key.startswith("/") or "\\" in key:
        raise InvalidArgumentError(f"store path {key!r} must be relative", field="path")
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InvalidArgumentError(f"store path {key!r} leaves the store root", field="path")
    return "/".join(parts)
