"""At most one scheduler writes state: an epoch fence on S3 conditional writes.

A ``Recreate`` rollout stops the old scheduler before the new one starts, but
a node partition does not: the old process can still reach S3 while its
replacement runs. Three things make the second writer harmless:

1. **The fence document** (``scheduler/fence.json``): ``{epoch, holder,
   expires_at}``. A scheduler *claims* it with a conditional write
   (``If-None-Match: *`` when absent, ``If-Match: <etag read>`` otherwise),
   so of two concurrent claims exactly one succeeds, and only once the
   current holder's lease has expired (``next_claim``, pure). Each claim
   raises the epoch by one. The holder renews with ``If-Match`` on its own
   etag; a renewal that fails means the fence was taken: stop writing.
2. **Every write checks the holder's own lease first** (``Fence.check``, no
   I/O): the holder counts its lease from the moment it *sent* its last
   successful renewal, on its monotonic clock, and stops writing
   ``margin_s`` before the store's record expires. A claimer waits for that
   record to expire, so the two never overlap unless wall clocks disagree by
   more than the margin (a quarter of the TTL) or a write spends longer than
   that in flight.
3. **Read-modify-write documents are conditional** (``FencedDocuments``):
   each write of the index documents is conditional on the etag this holder
   last saw for it (``If-Match``, or ``If-None-Match: *`` for a new one) and
   carries the writer's epoch (``fence_epoch``). After a claim the new
   holder *adopts* them (reads and rewrites each with its epoch), which
   changes their etags; any write the old holder still attempts then fails
   with 412 and raises ``FencedError``, however late it arrives.
   ``check_write`` (pure) refuses writes whose epoch is not the fence's
   current one.

``ConditionalStore`` is the three calls this needs; ``S3ConditionalStore``
speaks them to S3 (AWS S3 since 2024, SeaweedFS, MinIO),
``MemoryConditionalStore`` keeps them in a dict and ``LocalConditionalStore``
does them on any ``Store`` whose writers all live in this process
(``memory://``). ``file://`` stores use a kernel lock instead
(``fence_lock``); ``fence_keeper`` claims, renews and releases either kind
for the scheduler role, and ``persistence.JobStore`` checks it on every write.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from deep3m.core.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)
from deep3m.scheduler.conditional import ConditionalStore, ConditionFailed

FENCE_KEY = "scheduler/fence.json"
# The field of a fenced document that names the epoch of its writer.
EPOCH_FIELD = "fence_epoch"
# Share of the TTL a holder stops writing before its record expires in the store.
MARGIN_SHARE = 0.25


class FencedError(UnavailableError):
    """Another scheduler holds the fence (or took it over): this one must not write.

    UNAVAILABLE to callers: a worker retries its call, which then reaches the
    scheduler that holds the fence.
    """


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


class WriteFence(Protocol):
    """One scheduler's hold on the right to write state (``Fence``, ``LockFence``)."""

    @property
    def holder(self) -> str: ...

    @property
    def documents(self) -> ConditionalStore | None:
        """Where read-modify-write documents get conditional writes; None: the fence
        alone excludes other writers."""
        ...

    def acquire(self) -> FenceRecord:
        """Claim; ``FencedError`` naming the holder while another one holds it."""
        ...

    def renew(self) -> FenceRecord:
        """Keep holding; ``FencedError`` once the fence was lost."""
        ...

    def check(self) -> FenceRecord:
        """Before every write, without I/O: ``FencedError`` unless still held."""
        ...

    def verify(self) -> FenceRecord:
        """``check``, and against the fence as the store holds it now."""
        ...

    def release(self) -> None:
        """Give the fence up (at a clean stop) so the next scheduler claims at once."""
        ...


class Holding:
    """What a fence's holder holds now: its record, or why it holds none (thread-safe)."""

    def __init__(self, holder: str) -> None:
        self._holder = holder
        self._lock = threading.Lock()
        self._record: FenceRecord | None = None
        self._lost = ""

    @property
    def holder(self) -> str:
        return self._holder

    @property
    def record(self) -> FenceRecord:
        with self._lock:
            if self._record is None:
                raise FencedError(
                    self._lost or f"scheduler {self._holder!r} holds no fence", field="fence"
                )
            return self._record

    def _lose(self, why: str) -> FencedError:
        """Hold nothing from now on; the error that says ``why``."""
        with self._lock:
            self._record = None
            self._lost = why
        return FencedError(why, field="fence")


class Fence(Holding):
    """One scheduler's hold on the fence document (a ``WriteFence``)."""

    def __init__(
        self,
        store: ConditionalStore,
        holder: str,
        *,
        ttl_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(holder)
        self._store = store
        self._ttl = ttl_s
        self._margin = ttl_s * MARGIN_SHARE
        self._clock = clock
        self._monotonic = monotonic
        self._etag = ""
        self._writable_until = 0.0  # on the monotonic clock

    @property
    def documents(self) -> ConditionalStore:
        return self._store

    def _current(self) -> tuple[FenceRecord | None, str]:
        found = self._store.read(FENCE_KEY)
        return (None, "") if found is None else (FenceRecord.from_json(found[0]), found[1])

    def _hold(self, record: FenceRecord, etag: str, sent: float) -> None:
        with self._lock:
            self._record = record
            self._etag = etag
            # Counted from before the write was sent: the store's record outlives it.
            self._writable_until = sent + self._ttl - self._margin

    def acquire(self) -> FenceRecord:
        """Claim the fence (``FencedError`` while another holder's lease is live)."""
        sent = self._monotonic()
        current, etag = self._current()
        claim = next_claim(current, self._holder, self._clock(), self._ttl)
        try:
            if current is None:
                new_etag = self._store.create(FENCE_KEY, claim.to_json())
            else:
                new_etag = self._store.replace(FENCE_KEY, claim.to_json(), etag)
        except ConditionFailed:
            raise FencedError(
                f"scheduler {self._holder!r} lost the race for the fence to another claim",
                field="fence",
            ) from None
        self._hold(claim, new_etag, sent)
        return claim

    def renew(self) -> FenceRecord:
        """Extend the lease; ``FencedError`` when the fence was taken meanwhile.

        Other failures (the store unreachable) propagate and leave the lease to
        run out: writes stop at its end, and a later renewal may still succeed
        if no one claimed the fence meanwhile.
        """
        mine = self.record
        sent = self._monotonic()
        renewed = FenceRecord(mine.epoch, mine.holder, self._clock() + self._ttl)
        try:
            etag = self._store.replace(FENCE_KEY, renewed.to_json(), self._etag)
        except ConditionFailed:
            raise self._lose(
                f"scheduler {self._holder!r} (epoch {mine.epoch}) was fenced off by another "
                "scheduler"
            ) from None
        self._hold(renewed, etag, sent)
        return renewed

    def check(self) -> FenceRecord:
        """Before every write, no I/O: refused once lost or past this holder's own lease."""
        mine = self.record
        if self._monotonic() >= self._writable_until:
            raise FencedError(
                f"scheduler {self._holder!r} let its fence lapse (epoch {mine.epoch}): it was "
                "not renewed in time; no state is written until it is",
                field="fence",
            )
        return mine

    def verify(self) -> FenceRecord:
        """``check_write`` against the fence as the store holds it now, then ``check``."""
        mine = self.record
        current, _ = self._current()
        check_write(mine, current, self._clock())
        return self.check()

    def release(self) -> None:
        """Expire the record now (same epoch), so a successor claims without waiting."""
        with self._lock:
            mine, etag = self._record, self._etag
        self._lose(f"scheduler {self._holder!r} released its fence")
        if mine is None:
            return
        ended = FenceRecord(mine.epoch, mine.holder, self._clock())
        # Lost meanwhile: the fence is someone else's; nothing to give back.
        with contextlib.suppress(ConditionFailed):
            self._store.replace(FENCE_KEY, ended.to_json(), etag)


class FencedDocuments:
    """State documents written only by the fence's holder, each write conditional on its etag."""

    def __init__(self, store: ConditionalStore, fence: WriteFence) -> None:
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
        mine = self._fence.verify()
        data = json.dumps({**doc, EPOCH_FIELD: mine.epoch}, sort_keys=True).encode()
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

    def adopt(self, keys: Iterable[str], *, attempts: int = 3) -> None:
        """After a claim: rewrite each existing document with this epoch, voiding older etags.

        A late write of the previous holder landing between the read and the
        rewrite makes the rewrite fail; it is read again (it was that holder's
        to make).
        """
        for key in keys:
            for attempt in range(attempts):
                doc = self.read(key)
                if doc is None:
                    break
                try:
                    self.write(key, doc)
                    break
                except FencedError:
                    if attempt == attempts - 1:
                        raise
