"""The tiling role: the ``Tiling`` gRPC service plus a worker for ingest tasks."""

from __future__ import annotations

import grpc

from deep3m.runtime.server import WorkerRoleApp
from deep3m.runtime.settings import Settings
from deep3m.tiling.operations import TilingOperations
from deep3m.tiling.service import SERVICE_NAME, TilingServicer
from deep3m.tiling.tasks import IngestTaskHandlers
from deep3m.v1 import tiling_pb2_grpc


class TilingApp(WorkerRoleApp):
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings) -> None:
        self.operations = TilingOperations(settings)
        self.handlers = IngestTaskHandlers(settings)
        super().__init__(
            settings, {"ingest": self.handlers.ingest_range, "finalize": self.handlers.finalize}
        )

    def register(self, server: grpc.Server) -> None:
        tiling_pb2_grpc.add_TilingServicer_to_server(TilingServicer(self.operations), server)


def build(settings: Settings) -> TilingApp:
    return TilingApp(settings)
