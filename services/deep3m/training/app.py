"""The training role: the Training service plus a worker for ``train``/``finalize`` tasks."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from deep3m.runtime.settings import Settings
from deep3m.training.service import SERVICE_NAME, TrainingServicer
from deep3m.training.tasks import TrainingTasks
from deep3m.v1 import training_pb2_grpc

log = logging.getLogger("deep3m.training")


class TrainingApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tasks = TrainingTasks(settings)
        self._worker: Any = None

    def register(self, server: grpc.Server) -> None:
        training_pb2_grpc.add_TrainingServicer_to_server(TrainingServicer(self.settings), server)

    def start(self) -> None:
        if not self.settings.worker_enabled:
            return
        from deep3m.runtime.worker import Worker

        self._worker = Worker(
            self.settings, "training", {"train": self.tasks.train, "finalize": self.tasks.finalize}
        )
        self._worker.start()

    def stop(self, grace: float) -> None:
        if self._worker is not None:
            self._worker.stop(grace)
            self._worker = None


def build(settings: Settings) -> TrainingApp:
    return TrainingApp(settings)
