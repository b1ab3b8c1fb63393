"""``file://``: a folder on a local disk."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr.storage
from zarr.abc.store import Store as ZarrStore

from deep3m.core.store.base import PARTIAL_SUFFIX, Store


class FileStore(Store, scheme="file"):
    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        Path(self._root).mkdir(parents=True, exist_ok=True)

    def write_bytes(self, key: str, data: bytes) -> None:
        # Write then rename, so readers never see half a document.
        path = Path(self._full(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + PARTIAL_SUFFIX)
        tmp.write_bytes(data)
        tmp.replace(path)

    def _remove_empty_dir(self, full: str) -> None:
        if Path(full).is_dir():
            Path(full).rmdir()

    def zarr_store(self, key: str = "", *, read_only: bool = False) -> ZarrStore:
        path = Path(self._full(key))
        if not read_only:
            path.mkdir(parents=True, exist_ok=True)
        return zarr.storage.LocalStore(path, read_only=read_only)
