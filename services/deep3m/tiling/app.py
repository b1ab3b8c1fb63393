"""The tiling role: the ``Tiling`` gRPC service plus a worker for ingest tasks."""

from __future__ import annotations

from typing import Any

import grpc

from deep3m.runtime.settings import Settings
from deep3m.tiling.operations import TilingOperations
from deep3m.tiling.service import SERVICE_NAME, TilingServicer
from deep3m.tiling.tasks import IngestTaskHandlers
from deep3m.v1 import tiling_pb2_grpc


class TilingApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.operations = TilingOperations(settings)
        self.handlers = IngestTaskHandlers(settings)
        self._worker: Any = None

    def register(self, server: grpc.Server) -> None:
        tiling_pb2_grpc.add_TilingServicer_to_server(TilingServicer(self.operations), server)

    def start(self) -> None:
        if not self.settings.worker_enabled:
            return
        from deep3m.runtime.worker import Worker

        self._worker = Worker(
            self.settings,
            "tiling",
            {"ingest": self.handlers.ingest_range, "finalize": self.handlers.finalize},
        )
        self._worker.start()

    def stop(self, grace: float) -> None:
        if self._worker is not None:
            self._worker.stop(grace)
            self._worker = None


def build(settings: Settings) -> TilingApp:
    return TilingApp(settings)
