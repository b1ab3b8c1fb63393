"""The inference role: ``PredictRegion`` plus a worker that runs ``predict`` tasks.

Device: ``DEEP3M_DEVICE`` (auto = CUDA when present, float16 autocast there).
A pod with several GPUs runs one task thread per GPU: the worker's capacity is
raised to the GPU count when it is lower, and each task takes the least busy GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
import torch

from deep3m.inference.cache import DevicePool, ModelCache
from deep3m.inference.predictor import inference_devices
from deep3m.inference.region import RegionPredictor
from deep3m.inference.service import SERVICE_NAME, InferenceServicer
from deep3m.inference.tasks import PredictTaskHandler
from deep3m.runtime.server import WorkerRoleApp
from deep3m.runtime.settings import Settings
from deep3m.v1 import inference_pb2_grpc

log = logging.getLogger("deep3m.inference")


def one_task_per_gpu(settings: Settings, devices: Sequence[torch.device]) -> Settings:
    """Settings whose worker capacity is at least the number of GPUs."""
    gpus = sum(1 for d in devices if d.type == "cuda")
    if gpus <= settings.worker_capacity:
        return settings
    log.info("running one task per GPU", extra={"gpus": gpus})
    return settings.model_copy(update={"worker_capacity": gpus})


class InferenceApp(WorkerRoleApp):
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings) -> None:
        self.devices = DevicePool(inference_devices(settings.device))
        if any(d.type == "cuda" for d in self.devices.devices):
            # Block shapes repeat (only edge blocks differ): let cuDNN pick kernels once per shape.
            torch.backends.cudnn.benchmark = True
        settings = one_task_per_gpu(settings, self.devices.devices)
        # One model cache for tasks and regions: a model loads once per device.
        self.cache = ModelCache()
        self.regions = RegionPredictor(settings, cache=self.cache, devices=self.devices)
        self.predict = PredictTaskHandler(settings, cache=self.cache, devices=self.devices)
        super().__init__(settings, {"predict": self.predict})

    def register(self, server: grpc.Server) -> None:
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.regions), server)


def build(settings: Settings) -> InferenceApp:
    return InferenceApp(settings)
