"""The object store: zarr v3 volumes and JSON documents under one root URL.

Backends, one class each behind the ``Store`` interface (``Store(url)`` picks by
scheme): ``file://`` (default, ``FileStore``), ``s3://`` (s3fs, ``S3Store``) and
``memory://`` (tests, ``MemoryStore``). Modules: ``keys`` (URLs and keys),
``base`` (the interface and the fsspec defaults), ``volumes`` (OME-Zarr 0.5
volumes on any backend), one module per backend.
"""

from __future__ import annotations

from deep3m.core.store.base import Store, open_store
from deep3m.core.store.file import FileStore
from deep3m.core.store.keys import SUPPORTED_SCHEMES, check_key, normalize_url, url_scheme
from deep3m.core.store.memory import MemoryStore
from deep3m.core.store.s3 import S3Store
from deep3m.core.store.volumes import (
    AXES,
    DEFAULT_CHUNK_SHAPE,
    FULL_RESOLUTION,
    VolumeInfo,
    ome_multiscales,
)

__all__ = [
    "AXES",
    "DEFAULT_CHUNK_SHAPE",
    "FULL_RESOLUTION",
    "SUPPORTED_SCHEMES",
    "FileStore",
    "MemoryStore",
    "S3Store",
    "Store",
    "VolumeInfo",
    "check_key",
    "normalize_url",
    "ome_multiscales",
    "open_store",
    "url_scheme",
]
