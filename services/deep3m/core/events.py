"""Progress events and the observers that consume them.

One event stream feeds the CLI progress bar, the gRPC watch stream and the
Prometheus counters: producers call ``EventBus.publish``; each consumer holds a
``Subscription`` (an iterator with its own queue); code that runs in-process
takes an ``Observer`` callback instead.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

JOB_STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


@dataclass(frozen=True)
class ProgressEvent:
    job_id: str
    state: str = ""  # PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED
    stage: str = ""
    tasks_done: int = 0
    tasks_total: int = 0
    voxels_per_second: float = 0.0
    eta_seconds: float = 0.0
    message: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    error: str = ""
    task_id: str = ""
    time_unix_s: float = field(default_factory=time.time)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class Observer(Protocol):
    def __call__(self, event: ProgressEvent) -> None: ...


class Subscription:
    """A bounded queue of events for one consumer; iterate until closed."""

    def __init__(self, bus: EventBus, job_id: str | None, maxsize: int) -> None:
        self._bus = bus
        self.job_id = job_id
        self._queue: queue.Queue[ProgressEvent | None] = queue.Queue(maxsize)
        self._closed = threading.Event()

    def _offer(self, event: ProgressEvent) -> None:
        if self.job_id is not None and event.job_id != self.job_id:
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            # A slow consumer loses intermediate progress, never the final state.
            if event.terminal:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
                self._queue.put_nowait(event)

    def get(self, timeout: float | None = None) -> ProgressEvent | None:
        """The next event, or None on timeout or when closed."""
        if self._closed.is_set() and self._queue.empty():
            return None
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._bus._unsubscribe(self)
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)

    def __iter__(self) -> Iterator[ProgressEvent]:
        while True:
            event = self.get()
            if event is None:
                return
            yield event


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscriptions: list[Subscription] = []

    def subscribe(self, job_id: str | None = None, maxsize: int = 1024) -> Subscription:
        sub = Subscription(self, job_id, maxsize)
        with self._lock:
            self._subscriptions.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscriptions:
                self._subscriptions.remove(sub)

    def publish(self, event: ProgressEvent) -> None:
        with self._lock:
            subs = list(self._subscriptions)
        for sub in subs:
            sub._offer(event)
