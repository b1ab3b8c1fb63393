"""The scheduler role's fence: the kind its store needs, claimed at start, renewed, released.

``open_fence`` picks the mechanism by the store's scheme: ``file://`` an exclusive
kernel lock (``fence_lock.LockFence``: released when the process ends),
``s3://`` the epoch fence on conditional writes (``fencing.Fence``), ``memory://``
the same fence on a store that only this process writes.

``FenceKeeper.claim`` tries to claim for up to ``fence_wait_seconds``: a
successor of a scheduler that died without releasing waits for its TTL to
run out, while one facing a live holder gives up with a ``FencedError``
naming it. Once claimed, a thread renews every ``fence_renew_seconds``; a
renewal that finds the fence taken calls ``on_lost`` (the role stops
serving and exits), a renewal that fails otherwise (store unreachable) is
retried, and writes stop by themselves if the lease runs out meanwhile.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from deep3m.core.retry import Backoff
from deep3m.core.store import Store, url_scheme
from deep3m.runtime.settings import Settings
from deep3m.scheduler.conditional import LocalConditionalStore, S3ConditionalStore
from deep3m.scheduler.fence_lock import LockFence
from deep3m.scheduler.fencing import Fence, FencedError, FenceRecord, WriteFence

log = logging.getLogger("deep3m.scheduler")


def holder_name() -> str:
    """This process, as a fence holder: host (the pod's name on Kubernetes), pid, nonce."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def open_fence(store: Store, settings: Settings, holder: str) -> WriteFence:
    """The fence of ``store``'s state for ``holder``, not claimed yet."""
    ttl = settings.fence_ttl_seconds
    scheme = url_scheme(store.url)
    if scheme == "file":
        return LockFence(Path(store.url.removeprefix("file://")), holder, ttl_s=ttl)
    if scheme == "s3":
        conditional = S3ConditionalStore.for_store(store.url, store.storage_options)
        return Fence(conditional, holder, ttl_s=ttl)
    return Fence(LocalConditionalStore(store), holder, ttl_s=ttl)


class FenceKeeper:
    """Claims a fence (waiting a while for a lapsing one), renews it, releases it at stop."""

    def __init__(
        self,
        fence: WriteFence,
        *,
        renew_s: float,
        wait_s: float,
        on_lost: Callable[[FencedError], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fence = fence
        self._renew_s = renew_s
        self._wait_s = wait_s
        self._on_lost = on_lost
        self._monotonic = monotonic
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False

    @classmethod
    def from_settings(
        cls, fence: WriteFence, settings: Settings, on_lost: Callable[[FencedError], None]
    ) -> FenceKeeper:
        return cls(
            fence,
            renew_s=settings.fence_renew_seconds,
            wait_s=settings.fence_wait_seconds,
            on_lost=on_lost,
        )

    def claim(self) -> FenceRecord:
        """Claim the fence, retrying for ``wait_s``; the last ``FencedError`` after that."""
        deadline = self._monotonic() + self._wait_s
        backoff = Backoff(initial_s=min(0.5, self._renew_s), max_s=self._renew_s)
        next_note = 0.0
        while True:
            try:
                record = self.fence.acquire()
            except FencedError as exc:
                left = deadline - self._monotonic()
                if left <= 0 or self._stop.is_set():
                    raise
                if self._monotonic() >= next_note:  # every 10 s, not every attempt
                    next_note = self._monotonic() + 10.0
                    log.warning(
                        "waiting up to %.0f s for the fence: %s",
                        left,
                        exc.message,
                        extra={"holder": self.fence.holder},
                    )
                self._stop.wait(min(backoff.next_delay(), left))
                continue
            log.info(
                "holding the fence: epoch %d",
                record.epoch,
                extra={"holder": record.holder, "epoch": record.epoch},
            )
            return record

    def start(self) -> None:
        """Renew in the background until ``stop`` or until the fence is lost."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._renew_loop, name="scheduler-fence", daemon=True
            )
            self._thread.start()

    def _renew_loop(self) -> None:
        backoff = Backoff(initial_s=min(0.5, self._renew_s), max_s=self._renew_s)
        delay = self._renew_s
        while not self._stop.wait(delay):
            try:
                self.fence.renew()
            except FencedError as exc:
                self._lost = True
                log.error("stopping: %s", exc.message, extra={"holder": self.fence.holder})
                self._on_lost(exc)
                return
            except Exception:  # the store unreachable: retry; writes stop if the lease ends
                log.exception("cannot renew the scheduler's fence; retrying")
                delay = backoff.next_delay()
                continue
            backoff.reset()
            delay = self._renew_s

    def stop(self, timeout: float = 5.0) -> None:
        """Stop renewing; release the fence unless it was lost."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if not self._lost:
            try:
                self.fence.release()
            except Exception:  # it lapses by itself after its TTL
                log.exception("cannot release the scheduler's fence")
