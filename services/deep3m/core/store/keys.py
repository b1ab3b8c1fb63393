"""Store URLs and the keys inside a store."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from deep3m.core.errors import InvalidArgumentError, clip

SUPPORTED_SCHEMES = ("file", "s3", "memory")


def url_scheme(url: str) -> str:
    """The scheme of a store URL; a plain path is ``file``."""
    if "://" not in url:
        return "file"
    try:
        return urlparse(url).scheme
    except ValueError as exc:  # e.g. an unbalanced "[" read as an IPv6 host
        raise InvalidArgumentError(
            f"store URL {clip(url)} does not parse: {exc}", field="store_url"
        ) from None


def normalize_url(url: str) -> str:
    """Canonical form of a store URL: scheme, no trailing slash, absolute files."""
    if "://" not in url:
        url = "file://" + url
    scheme = url_scheme(url)
    if scheme not in SUPPORTED_SCHEMES:
        raise InvalidArgumentError(
            f"unsupported store URL scheme {clip(scheme)} in {clip(url)}; "
            f"use one of {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}",
            field="store_url",
        )
    if scheme == "file":
        local = url[len("file://") :]
        try:
            return "file://" + str(Path(local).expanduser().resolve())
        except (RuntimeError, OSError, ValueError) as exc:  # "~nobody", loops, ...
            raise InvalidArgumentError(
                f"store URL {clip(url)} names no usable local path: {exc}", field="store_url"
            ) from None
    return url.rstrip("/")


def check_key(key: str) -> str:
    """A relative key inside the store: no absolute paths, no ``..`` escapes."""
    if key.startswith("/") or "\\" in key:
        raise InvalidArgumentError(f"store path {clip(key)} must be relative", field="path")
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InvalidArgumentError(f"store path {clip(key)} leaves the store root", field="path")
    if parts and parts[0].endswith(":"):
        # "s3://bucket/x.zarr" as a path would become a local folder named "s3:".
        raise InvalidArgumentError(
            f"store path {clip(key)} is a URL; give it as the store URL, not as a store path",
            field="path",
        )
    return "/".join(parts)


def labelling_documents(job_id: str) -> str:
    """Where the sharded labelling stages of job ``job_id`` keep their small documents
    (in the default store): written by the postprocess workers while the job runs,
    deleted by the scheduler once it has succeeded."""
    return f"jobs/{job_id}/labelling"


def ingest_documents(job_id: str) -> str:
    """Where the ingest tasks of job ``job_id`` leave their ranges' grey-level counts
    (in the default store); the job's finalize task adds them up and deletes them."""
    return f"jobs/{job_id}/ingest/grey_levels"
