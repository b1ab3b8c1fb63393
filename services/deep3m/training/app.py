"""The training role: the Training service plus a worker for ``train``/``finalize`` tasks."""

from __future__ import annotations

import grpc

from deep3m.runtime.server import WorkerRoleApp
from deep3m.runtime.settings import Settings
from deep3m.training.service import SERVICE_NAME, TrainingServicer
from deep3m.training.tasks import TrainingTasks
from deep3m.v1 import training_pb2_grpc


class TrainingApp(WorkerRoleApp):
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings) -> None:
        self.tasks = TrainingTasks(settings)
        super().__init__(settings, {"train": self.tasks.train, "finalize": self.tasks.finalize})

    def register(self, server: grpc.Server) -> None:
        training_pb2_grpc.add_TrainingServicer_to_server(TrainingServicer(self.settings), server)


def build(settings: Settings) -> TrainingApp:
    return TrainingApp(settings)
