"""The store interface: JSON documents and bytes under keys of one root URL.

``Store(url)`` gives the backend for the URL's scheme (``FileStore``,
``S3Store``, ``MemoryStore``), each registered by subclassing with
``scheme=...``. Every backend reaches its objects through an fsspec
filesystem; a backend overrides only what its medium does differently
(atomic writes, directory entries, listing caches, the zarr store class).
OME-Zarr volumes on top of the keys come from ``VolumeStore``.
"""

from __future__ import annotations

import builtins
import json
import posixpath
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import fsspec
import zarr.storage
from zarr.abc.store import Store as ZarrStore

from deep3m.core.errors import InvalidArgumentError, NotFoundError
from deep3m.core.store.keys import check_key, normalize_url, url_scheme
from deep3m.core.store.volumes import VolumeStore

# Suffix of a document being written (file backend); never listed.
PARTIAL_SUFFIX = ".tmp"


class Store(VolumeStore):
    """One store root. Thread-safe for independent keys; cheap to construct."""

    scheme: ClassVar[str] = ""
    # Whether ``storage_options`` mean anything to this backend (others ignore them).
    takes_options: ClassVar[bool] = False
    _backends: ClassVar[dict[str, type[Store]]] = {}

    def __init_subclass__(cls, *, scheme: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if scheme:
            cls.scheme = scheme
            Store._backends[scheme] = cls

    def __new__(cls, *args: Any, **kwargs: Any) -> Store:
        # ``Store(url)`` is the backend for the URL; a backend class (and copy or
        # pickle, which call ``__new__`` without arguments) is itself.
        if cls is Store:
            url = args[0] if args else kwargs["url"]
            cls = Store._backends[url_scheme(normalize_url(url))]
        return super().__new__(cls)

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = normalize_url(url)
        self.storage_options: dict[str, Any] = (
            dict(storage_options or {}) if self.takes_options else {}
        )
        self._fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self._root = str(root).rstrip("/")

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- keys and documents -------------------------------------------------
    def _full(self, key: str) -> str:
        key = check_key(key)
        return f"{self._root}/{key}" if key else self._root

    def key_url(self, key: str) -> str:
        return f"{self.url}/{check_key(key)}"

    def exists(self, key: str) -> bool:
        return bool(self._fs.exists(self._full(key)))

    def write_bytes(self, key: str, data: bytes) -> None:
        """Replace the object at ``key`` whole; readers see the old or the new bytes."""
        # Object stores replace whole objects atomically on PUT.
        self._fs.pipe_file(self._full(key), data)

    def read_bytes(self, key: str) -> bytes:
        try:
            return bytes(self._fs.cat_file(self._full(key)))
        except FileNotFoundError as exc:
            raise NotFoundError(f"{self.key_url(key)} does not exist", field=key) from exc

    def size(self, key: str) -> int:
        """Bytes in the object at ``key``."""
        try:
            return int(self._fs.size(self._full(key)))
        except FileNotFoundError as exc:
            raise NotFoundError(f"{self.key_url(key)} does not exist", field=key) from exc

    def read_range(self, key: str, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of the object at ``key`` (one ranged read)."""
        try:
            return bytes(self._fs.cat_file(self._full(key), start=start, end=stop))
        except FileNotFoundError as exc:
            raise NotFoundError(f"{self.key_url(key)} does not exist", field=key) from exc

    def signed_url(self, key: str, expires_s: int) -> str:
        """A URL that reads ``key`` without credentials for ``expires_s`` (object stores)."""
        try:
            return str(self._fs.sign(self._full(key), expiration=expires_s))
        except NotImplementedError as exc:
            raise InvalidArgumentError(
                f"{self.url} cannot sign URLs (only object stores can)", field="store"
            ) from exc

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, key: str) -> Any:
        raw = self.read_bytes(key)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(
                f"{self.key_url(key)} is not valid JSON: {exc}", field=key
            ) from exc

    def list(self, prefix: str) -> builtins.list[str]:
        """Immediate children of ``prefix`` (names, not keys); empty if absent."""
        try:
            entries = self._fs.ls(self._full(prefix), detail=False)
        except FileNotFoundError:
            return []
        names = sorted({posixpath.basename(str(e).rstrip("/")) for e in entries})
        return [n for n in names if n and not n.endswith(PARTIAL_SUFFIX)]

    def walk_files(self, prefix: str) -> Iterator[str]:
        base = self._full(prefix)
        try:
            found = self._fs.find(base)
        except FileNotFoundError:
            return
        root_len = len(self._root) + 1
        for path in found:
            yield str(path)[root_len:]

    def delete(self, prefix: str) -> None:
        """Remove a key or a whole prefix; missing is fine."""
        path = self._full(prefix)
        if not check_key(prefix):
            raise InvalidArgumentError("refusing to delete the store root", field="path")
        try:
            if self._fs.exists(path):
                self._fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        self._refresh()
        try:
            self._prune_empty_dirs(check_key(prefix))
        finally:
            # Listings cached while pruning must not hide later writes.
            self._refresh()

    def _refresh(self) -> None:
        """Forget cached listings (backends whose filesystem caches them)."""

    def _remove_dir_entries_below(self, full: str) -> None:
        """Remove directory entries a recursive delete leaves below ``full``."""

    def _remove_empty_dir(self, full: str) -> None:
        """Remove the (empty) directory entry ``full``, where the medium keeps one."""

    def _prune_empty_dirs(self, key: str) -> None:
        """Drop directories left empty by a delete, so every backend lists alike."""
        parts = key.split("/")
        try:
            self._remove_dir_entries_below(self._full(key))
            # The deleted key may remain as a directory entry, then its parents.
            for depth in range(len(parts), 0, -1):
                full = self._full("/".join(parts[:depth]))
                if self._fs.exists(full) and any(
                    str(entry).rstrip("/") != full for entry in self._fs.ls(full, detail=False)
                ):
                    return
                self._remove_empty_dir(full)
        except OSError:  # includes FileNotFoundError: a concurrent writer got there first
            return

    # -- zarr --------------------------------------------------------------
    def zarr_store(self, key: str = "", *, read_only: bool = False) -> ZarrStore:
        """A zarr store rooted at ``key`` inside this store."""
        return zarr.storage.FsspecStore.from_url(
            self.key_url(key) if key else self.url,
            storage_options=self.storage_options or None,
            read_only=read_only,
        )


def open_store(url: str, settings: Any = None) -> Store:
    """A store for ``url`` with S3 options from settings (or the AWS chain)."""
    return Store(url, settings.storage_options() if settings is not None else None)
