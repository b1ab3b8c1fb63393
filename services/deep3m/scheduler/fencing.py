"""At most one scheduler writes state: an epoch fence on S3 conditional writes.

A ``Recreate`` rollout stops the old scheduler before the new one starts, but
a node partition does not: the old process can still reach S3 while its
replacement runs. Two things make the second writer harmless:

1. **The fence document** (``scheduler/fence.json``): ``{epoch, holder,
   expires_at}``. A scheduler *claims* it with a conditional write
   (``If-None-Match: *`` when absent, ``If-Match: <etag read>`` otherwise),
   so of two concurrent claims exactly one succeeds, and only once the
   current holder's lease has expired (``next_claim``, pure). Each claim
   raises the epoch by one. The holder renews with ``If-Match`` on its own
   etag; a renewal that fails means the fence was taken: stop writing.
2. **Fenced state documents**: every state write is conditional on the etag
   this holder last saw for that document (``If-Match``, or
   ``If-None-Match: *`` for a new one) and carries the writer's epoch. After a
   claim the new holder *adopts* the existing documents (reads and rewrites
   each with its epoch), which changes their etags; any write the old holder
   still attempts then fails with 412 and raises ``FencedError``, however
   late it arrives. ``check_write`` (pure) refuses writes whose epoch is not
   the fence's current one.

A document only the old holder knows and that the new one has not adopted
yet (created between the claim and the adoption) can still be written once;
its epoch marks it stale, and readers drop documents of older epochs.

``ConditionalStore`` is the three calls this needs; ``S3ConditionalStore``
speaks them to S3 (AWS S3 since 2024, SeaweedFS, MinIO), and
``MemoryConditionalStore`` keeps them in a dict for tests. The module is self-
contained: the scheduler's persistence layer calls ``Fence.acquire`` at start,
``Fence.renew`` from its reaper, and ``FencedDocuments.write`` for each state
document.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from deep3m.core.errors import FailedPreconditionError, InvalidArgumentError

FENCE_KEY = "scheduler/fence.json"


class FencedError(FailedPreconditionError):
    """Another scheduler holds the fence (or took it over): this one must not write."""


class ConditionFailed(Exception):
    """A conditional write lost: the document changed (or exists) since it was read."""


@dataclass(frozen=True)
class FenceRecord:
    """Who may write state: the holder of the current epoch, until ``expires_at`` (wall clock)."""

    epoch: int
    holder: str
    expires_at: float

    def to_json(self) -> bytes:
        doc = {"epoch": self.epoch, "holder": self.holder, "expires_at": self.expires_at}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> FenceRecord:
        try:
            doc = json.loads(data)
            return cls(int(doc["epoch"]), str(doc["holder"]), float(doc["expires_at"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise FailedPreconditionError(
                f"{FENCE_KEY} is not a fence record ({exc}); remove it only when no scheduler runs",
                field="fence",
            ) from None


def next_claim(current: FenceRecord | None, holder: str, now: float, ttl_s: float) -> FenceRecord:
    """The record ``holder`` writes to claim the fence at ``now``; ``FencedError`` if it may not.

    Free (absent or expired) fences, and the holder's own, may be claimed;
    every claim by a new holder raises the epoch.
    """
    if not holder:
        raise InvalidArgumentError("the fence holder needs a name", field="holder")
    if ttl_s <= 0:
        raise InvalidArgumentError(f"ttl_s must be > 0, got {ttl_s}", field="ttl_s")
    if current is None:
        return FenceRecord(1, holder, now + ttl_s)
    if current.holder == holder:
        return FenceRecord(current.epoch, holder, now + ttl_s)
    if now < current.expires_at:
        raise FencedError(
            f"scheduler {current.holder!r} holds epoch {current.epoch} for another "
            f"{current.expires_at - now:.0f} s; only one scheduler may write state",
            field="fence",
        )
    return FenceRecord(current.epoch + 1, holder, now + ttl_s)


def check_write(mine: FenceRecord, current: FenceRecord | None, now: float) -> None:
    """Refuse a state write by ``mine`` unless it is the live holder of the current epoch."""
    if current is None or (current.epoch, current.holder) != (mine.epoch, mine.holder):
        found = "no fence" if current is None else f"epoch {current.epoch} of {current.holder!r}"
        raise FencedError(
            f"scheduler {mine.holder!r} (epoch {mine.epoch}) was fenced off: the store holds "
            f"{found}",
            field="fence",
        )
    if now >= current.expires_at:
        raise FencedError(
            f"scheduler {mine.holder!r} let its fence lapse (epoch {mine.epoch}); renew first",
            field="fence",
        )


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


class S3ConditionalStore:
    """``ConditionalStore`` on an S3 bucket and prefix, via a botocore S3 client."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self._client = client
        self._bucket = bucket
        self._prefix = prefix.strip("/")

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


class Fence:
    """One scheduler's hold on the fence document."""

    def __init__(
        self,
        store: ConditionalStore,
        holder: str,
        *,
        ttl_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._holder = holder
        self._ttl = ttl_s
        self._clock = clock
        self._record: FenceRecord | None = None
        self._etag = ""

    @property
    def record(self) -> FenceRecord:
        if self._record is None:
            raise FencedError(f"scheduler {self._holder!r} holds no fence", field="fence")
        return self._record

    def _current(self) -> tuple[FenceRecord | None, str]:
        found = self._store.read(FENCE_KEY)
        return (None, "") if found is None else (FenceRecord.from_json(found[0]), found[1])

    def acquire(self) -> FenceRecord:
        """Claim the fence (``FencedError`` while another holder's lease is live)."""
        current, etag = self._current()
        claim = next_claim(current, self._holder, self._clock(), self._ttl)
        try:
            if current is None:
                self._etag = self._store.create(FENCE_KEY, claim.to_json())
            else:
                self._etag = self._store.replace(FENCE_KEY, claim.to_json(), etag)
        except ConditionFailed:
            raise FencedError(
                f"scheduler {self._holder!r} lost the race for the fence to another claim",
                field="fence",
            ) from None
        self._record = claim
        return claim

    def renew(self) -> FenceRecord:
        """Extend the lease; ``FencedError`` when the fence was taken meanwhile."""
        mine = self.record
        renewed = FenceRecord(mine.epoch, mine.holder, self._clock() + self._ttl)
        try:
            self._etag = self._store.replace(FENCE_KEY, renewed.to_json(), self._etag)
        except ConditionFailed:
            self._record = None
            raise FencedError(
                f"scheduler {self._holder!r} (epoch {mine.epoch}) was fenced off by another "
                "scheduler",
                field="fence",
            ) from None
        self._record = renewed
        return renewed

    def check(self) -> FenceRecord:
        """``check_write`` against the fence as the store holds it now."""
        mine = self.record
        current, _ = self._current()
        check_write(mine, current, self._clock())
        return mine


class FencedDocuments:
    """State documents written only by the fence's holder, each write conditional on its etag."""

    def __init__(self, store: ConditionalStore, fence: Fence) -> None:
        self._store = store
        self._fence = fence
        self._etags: dict[str, str] = {}

    def read(self, key: str) -> dict[str, Any] | None:
        found = self._store.read(key)
        if found is None:
            self._etags.pop(key, None)
            return None
        data, etag = found
        self._etags[key] = etag
        doc: dict[str, Any] = json.loads(data)
        return doc

    def write(self, key: str, doc: dict[str, Any]) -> None:
        """Write ``doc`` with this holder's epoch, only over the version this holder last saw."""
        mine = self._fence.check()
        data = json.dumps({**doc, "epoch": mine.epoch}, sort_keys=True).encode()
        etag = self._etags.get(key)
        try:
            if etag is None:
                self._etags[key] = self._store.create(key, data)
            else:
                self._etags[key] = self._store.replace(key, data, etag)
        except ConditionFailed:
            raise FencedError(
                f"{key} changed since scheduler {mine.holder!r} (epoch {mine.epoch}) read it: "
                "another scheduler took over",
                field="fence",
            ) from None

    def adopt(self, keys: Iterable[str]) -> None:
        """After a claim: rewrite each existing document with this epoch, voiding older etags."""
        for key in keys:
            doc = self.read(key)
            if doc is not None:
                self.write(key, doc)
