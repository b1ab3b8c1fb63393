"""``s3://``: a bucket and prefix through s3fs (asynchronous inside zarr).

``storage_options`` carry credentials, endpoint and region (empty: the AWS
chain). s3fs caches listings, so they are dropped after deletes; S3 servers
with a real namespace (SeaweedFS) keep directory entries, which a delete
removes so that every backend lists alike.
"""

from __future__ import annotations

from typing import Any, ClassVar

from deep3m.core.store.base import Store


def _dirs_under(fs: Any, full: str) -> list[str]:
    """Directory entries below ``full`` (children first)."""
    found: list[str] = []
    try:
        entries = fs.ls(full, detail=True, refresh=True)
    except FileNotFoundError:
        return found
    for entry in entries:
        name = str(entry["name"]).rstrip("/")
        if name != full and entry.get("type") == "directory":
            found += _dirs_under(fs, name)
            found.append(name)
    return found


class S3Store(Store, scheme="s3"):
    takes_options: ClassVar[bool] = True

    def _refresh(self) -> None:
        self._fs.invalidate_cache()

    def _remove_dir_entries_below(self, full: str) -> None:
        for entry in _dirs_under(self._fs, full):
            self._fs.rm_file(entry + "/")
        self._fs.invalidate_cache()

    def _remove_empty_dir(self, full: str) -> None:
        self._fs.rm_file(full + "/")
        self._fs.invalidate_cache()
