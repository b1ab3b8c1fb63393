"""Object stores with conditional writes, what the scheduler's fence stands on.

``create`` writes only if the key is absent (S3 ``If-None-Match: *``), ``replace``
only if the key's etag is still the one read (``If-Match``); either raises
``ConditionFailed`` otherwise. Backends: a dict (``memory://`` and tests), a
folder (compare-and-write under an exclusive lock), and S3.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from deep3m.core.errors import (
    NotFoundError,
)
from deep3m.core.store import Store


class ConditionFailed(Exception):
    """A conditional write lost: the document changed (or exists) since it was read."""


class ConditionalStore(Protocol):
    """Object reads and conditional writes; etags are opaque strings."""

    def read(self, key: str) -> tuple[bytes, str] | None: ...

    def create(self, key: str, data: bytes) -> str:
        """Write ``key`` only if absent (``If-None-Match: *``); its new etag."""
        ...

    def replace(self, key: str, data: bytes, etag: str) -> str:
        """Write ``key`` only if its etag is still ``etag`` (``If-Match``); its new etag."""
        ...


class MemoryConditionalStore:
    """``ConditionalStore`` in a dict (etag: MD5 of the content and a write counter)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, tuple[bytes, str]] = {}
        self._writes = 0

    def _etag(self, data: bytes) -> str:
        self._writes += 1
        return hashlib.md5(data + str(self._writes).encode(), usedforsecurity=False).hexdigest()

    def read(self, key: str) -> tuple[bytes, str] | None:
        with self._lock:
            return self._objects.get(key)

    def create(self, key: str, data: bytes) -> str:
        with self._lock:
            if key in self._objects:
                raise ConditionFailed(key)
            etag = self._etag(data)
            self._objects[key] = (data, etag)
            return etag

    def replace(self, key: str, data: bytes, etag: str) -> str:
        with self._lock:
            if key not in self._objects or self._objects[key][1] != etag:
                raise ConditionFailed(key)
            new = self._etag(data)
            self._objects[key] = (data, new)
            return new


class LocalConditionalStore:
    """``ConditionalStore`` on a ``Store`` whose every writer is in this process.

    Etags are MD5s of the content (as S3's for single-part objects); one lock
    per store URL makes compare-and-write atomic, which holds for ``memory://``
    (one process) and nowhere else.
    """

    _locks: ClassVar[dict[str, threading.Lock]] = {}
    _locks_guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, store: Store) -> None:
        self._store = store
        with self._locks_guard:
            self._lock = self._locks.setdefault(store.url, threading.Lock())

    @staticmethod
    def _etag(data: bytes) -> str:
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def _read(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._store.read_bytes(key)
        except NotFoundError:
            return None
        return data, self._etag(data)

    def read(self, key: str) -> tuple[bytes, str] | None:
        with self._lock:
            return self._read(key)

    def create(self, key: str, data: bytes) -> str:
        with self._lock:
            if self._read(key) is not None:
                raise ConditionFailed(key)
            self._store.write_bytes(key, data)
            return self._etag(data)

    def replace(self, key: str, data: bytes, etag: str) -> str:
        with self._lock:
            found = self._read(key)
            if found is None or found[1] != etag:
                raise ConditionFailed(key)
            self._store.write_bytes(key, data)
            return self._etag(data)


class S3ConditionalStore:
    """``ConditionalStore`` on an S3 bucket and prefix, via a botocore S3 client."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self._client = client
        self._bucket = bucket
        self._prefix = prefix.strip("/")

    @classmethod
    def for_store(cls, url: str, options: Mapping[str, Any]) -> S3ConditionalStore:
        """The bucket and prefix of ``s3://bucket/prefix``, with a botocore client built
        from the store's fsspec options (keys, endpoint, region; else the AWS chain)."""
        import botocore.session

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        client_kwargs = dict(options.get("client_kwargs", {}))
        if options.get("key"):
            client_kwargs["aws_access_key_id"] = options["key"]
            client_kwargs["aws_secret_access_key"] = options.get("secret", "")
        client = botocore.session.get_session().create_client("s3", **client_kwargs)
        return cls(client, bucket, prefix)

    def _key(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    @staticmethod
    def _code(exc: Exception) -> str:
        response = getattr(exc, "response", None) or {}
        return str(response.get("Error", {}).get("Code", ""))

    def read(self, key: str) -> tuple[bytes, str] | None:
        try:
            reply = self._client.get_object(Bucket=self._bucket, Key=self._key(key))
        except Exception as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        return reply["Body"].read(), str(reply["ETag"])

    def _put(self, key: str, data: bytes, **condition: str) -> str:
        try:
            reply = self._client.put_object(
                Bucket=self._bucket, Key=self._key(key), Body=data, **condition
            )
        except Exception as exc:
            # 409 ConditionalRequestConflict: a concurrent conditional write won.
            if self._code(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                raise ConditionFailed(key) from None
            raise
        return str(reply["ETag"])

    def create(self, key: str, data: bytes) -> str:
        return self._put(key, data, IfNoneMatch="*")

    def replace(self, key: str, data: bytes, etag: str) -> str:
        return self._put(key, data, IfMatch=etag)
