"""The scheduler role: the Scheduler service, its lease reaper, and the autoscaler.

The server binds its port first, health answering NOT_SERVING; jobs are then
recovered from the store in ``start`` (requests meanwhile get UNAVAILABLE, which
workers and clients retry), and health turns SERVING once recovery has ended.
WatchJob streams run on threads of their own (``stream_threads``), which the
server adds to its pool for unary calls.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc

from deep3m.runtime.settings import Settings
from deep3m.scheduler.core import Scheduler
from deep3m.scheduler.service import SchedulerServicer
from deep3m.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("deep3m.scheduler")

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


class SchedulerApp:
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, settings: Settings, scheduler: Scheduler) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.autoscaler: Any = None
        self.stream_threads = settings.max_watch_streams

    def register(self, server: grpc.Server) -> None:
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(
            SchedulerServicer(self.scheduler, max_watchers=self.stream_threads), server
        )

    def start(self) -> None:
        self.scheduler.recover()
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


def build(settings: Settings) -> SchedulerApp:
    scheduler = Scheduler(settings)
    scheduler.begin_recovery()
    return SchedulerApp(settings, scheduler)
