"""At most one scheduler writes a ``file://`` store: an exclusive lock the kernel holds.

``scheduler/fence.lock`` is locked with ``flock(LOCK_EX | LOCK_NB)`` for the
scheduler's whole life. The kernel drops the lock when the process ends, however it
ends (SIGKILL included), so a successor claims at once after a crash, with no TTL and
no clocks; while the holder lives, every other claim is refused, and two schedulers
in one process conflict too (``flock`` locks belong to an open file, not a process).
The lock file holds the holder's ``FenceRecord``, written through the locked file
descriptor, so a refused claim names the holder and each claim raises the epoch.

A renewal rewrites that record through the descriptor and checks that the path still
names the locked file: one deleted or replaced (by hand, or a store wiped under a
running scheduler) means another process may lock a new one, so this one stops
writing. On NFS, Linux turns ``flock`` into a POSIX lock that the server keeps while
the client renews its lease; a client cut off loses it and its I/O on the descriptor
fails, which the next renewal reports as a lost fence.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from deep3m.scheduler.fencing import FencedError, FenceRecord, Holding

LOCK_KEY = "scheduler/fence.lock"


class LockFence(Holding):
    """A ``WriteFence`` on a local (or NFS) folder: ``flock`` on ``<root>/scheduler/fence.lock``."""

    def __init__(
        self,
        root: Path,
        holder: str,
        *,
        ttl_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(holder)
        self._path = root / LOCK_KEY
        self._ttl = ttl_s
        self._clock = clock
        self._fd: int | None = None

    @property
    def documents(self) -> None:
        # Only the lock's holder writes, so plain writes need no condition.
        return None

    def _read_record(self, fd: int) -> FenceRecord | None:
        data = os.pread(fd, 4096, 0)
        return FenceRecord.from_json(data) if data.strip() else None

    def _write_record(self, fd: int, record: FenceRecord) -> None:
        data = record.to_json()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def acquire(self) -> FenceRecord:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                held = self._read_record(fd)
            finally:
                os.close(fd)
            who = f"scheduler {held.holder!r} (epoch {held.epoch})" if held else "another scheduler"
            raise FencedError(
                f"{who} holds the lock {self._path}; only one scheduler may write state "
                "(the lock is released when that process ends)",
                field="fence",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            previous = self._read_record(fd)
        except FencedError:
            previous = None  # a torn record of a holder that died mid-write
        except BaseException:
            os.close(fd)
            raise
        record = FenceRecord(
            (previous.epoch if previous else 0) + 1, self._holder, self._clock() + self._ttl
        )
        try:
            self._write_record(fd, record)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            self._fd, self._record, self._lost = fd, record, ""
        return record

    def _lost_because(self, mine: FenceRecord, why: str) -> FencedError:
        return self._lose(f"scheduler {self._holder!r} (epoch {mine.epoch}) lost its fence: {why}")

    def renew(self) -> FenceRecord:
        mine = self.record
        fd = self._fd
        if fd is None:  # released meanwhile
            raise self._lost_because(mine, "released")
        try:
            same = os.fstat(fd).st_ino == os.stat(self._path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise self._lost_because(mine, f"{self._path} was removed or replaced")
        renewed = FenceRecord(mine.epoch, mine.holder, self._clock() + self._ttl)
        try:
            self._write_record(fd, renewed)
        except OSError as exc:
            raise self._lost_because(mine, f"cannot write {self._path}: {exc.strerror}") from None
        with self._lock:
            if self._record is None:
                raise FencedError(self._lost, field="fence")
            self._record = renewed
        return renewed

    def check(self) -> FenceRecord:
        return self.record

    def verify(self) -> FenceRecord:
        return self.record

    def release(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        self._lose(f"scheduler {self._holder!r} released its fence")
        if fd is not None:
            # Closing the descriptor drops the lock; the record stays for the epoch.
            with contextlib.suppress(OSError):
                os.close(fd)
