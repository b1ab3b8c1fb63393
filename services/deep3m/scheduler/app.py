"""The scheduler role: the Scheduler service, its lease reaper, and the autoscaler.

The server binds its port first, health answering NOT_SERVING. ``start`` then
claims the store's fence (``fence_keeper``: at most one scheduler writes state;
it waits up to ``fence_wait_seconds`` for another holder's fence to lapse and
otherwise fails, naming the holder, so the process exits non-zero), hands it
to the persistence layer, and recovers jobs from the store (requests meanwhile
get UNAVAILABLE, which workers and clients retry); health turns SERVING once
recovery has ended. A fence lost later (another scheduler claimed it) aborts
the server: NOT_SERVING at once, no more writes, a non-zero exit.
WatchJob streams run on threads of their own (``stream_threads``), which the
server adds to its pool for unary calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from deep3m.core.errors import Deep3mError
from deep3m.runtime.settings import Settings
from deep3m.scheduler.core import Scheduler
from deep3m.scheduler.fence_keeper import FenceKeeper, holder_name, open_fence
from deep3m.scheduler.fencing import FencedError, WriteFence
from deep3m.scheduler.service import SchedulerServicer
from deep3m.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("deep3m.scheduler")

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


class SchedulerApp:
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(
        self, settings: Settings, scheduler: Scheduler, *, fence: WriteFence | None = None
    ) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.autoscaler: Any = None
        self.stream_threads = settings.max_watch_streams
        # None: the fence of the scheduler's store, for this process.
        self.fence = fence
        self.keeper: FenceKeeper | None = None
        self._abort: Callable[[Deep3mError], None] | None = None

    def set_abort(self, abort: Callable[[Deep3mError], None]) -> None:
        """How to end the server from here (the fence was lost)."""
        self._abort = abort

    def _fence_lost(self, exc: FencedError) -> None:
        if self._abort is not None:
            self._abort(exc)

    def register(self, server: grpc.Server) -> None:
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(
            SchedulerServicer(self.scheduler, max_watchers=self.stream_threads), server
        )

    def start(self) -> None:
        fence = self.fence or open_fence(self.scheduler.store, self.settings, holder_name())
        keeper = FenceKeeper.from_settings(fence, self.settings, self._fence_lost)
        try:
            keeper.claim()  # before recovery reads anything: only the holder resumes jobs
        except FencedError as exc:
            log.error("not starting: %s", exc.message, extra={"holder": fence.holder})
            raise
        self.keeper = keeper
        try:
            self.scheduler.jobs_store.fence_with(fence)
            keeper.start()
            self.scheduler.recover()
        except BaseException:
            self.keeper = None
            keeper.stop()
            raise
        self.scheduler.start()
        if self.settings.autoscale_enabled:
            from deep3m.scheduler.autoscaler import Autoscaler

            self.autoscaler = Autoscaler.from_settings(
                self.settings,
                self.scheduler.pending_by_role,
                leased_by_role=self.scheduler.leased_by_role,
                held_by_role=self.scheduler.held_by_role,
                busy_by_pod=self.scheduler.busy_by_pod,
            )
            self.autoscaler.start()
            log.info("autoscaler started")

    def stop(self, grace: float) -> None:
        if self.autoscaler is not None:
            self.autoscaler.stop()
            self.autoscaler = None
        self.scheduler.stop(timeout=grace)
        if self.keeper is not None:
            self.keeper.stop()
            self.keeper = None


def build(settings: Settings) -> SchedulerApp:
    scheduler = Scheduler(settings)
    scheduler.begin_recovery()
    return SchedulerApp(settings, scheduler)
