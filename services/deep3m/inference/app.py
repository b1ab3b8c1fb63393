"""The inference role: ``PredictRegion`` plus a worker that runs ``predict`` tasks.

Device: ``DEEP3M_DEVICE`` (auto = CUDA when present, float16 autocast there).
A pod with several GPUs computes one block per GPU at a time, each task on the
least busy GPU; on the CPU, ``DEEP3M_WORKER_CAPACITY`` blocks compute at once.
The worker holds ``DEEP3M_INFERENCE_PIPELINE_DEPTH`` times as many blocks as it
computes, so reads and writes overlap compute (see :mod:`.cache`).
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


def compute_slots(settings: Settings, devices: Sequence[torch.device]) -> int:
    """Blocks computed at once per device: one per GPU; the worker capacity on the CPU."""
    return 1 if any(d.type == "cuda" for d in devices) else settings.worker_capacity


def pipelined(settings: Settings, devices: Sequence[torch.device]) -> Settings:
    """Settings whose worker capacity holds ``inference_pipeline_depth`` blocks per
    block computed at once (the blocks being read and written besides)."""
    computing = compute_slots(settings, devices) * len(devices)
    capacity = computing * settings.inference_pipeline_depth
    log.info(
        "pipelined prediction",
        extra={"computing": computing, "capacity": capacity, "devices": len(devices)},
    )
    return settings.model_copy(update={"worker_capacity": capacity})


class InferenceApp(WorkerRoleApp):
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings) -> None:
        devices = inference_devices(settings.device)
        self.devices = DevicePool(devices, slots=compute_slots(settings, devices))
        if any(d.type == "cuda" for d in devices):
            # Block shapes repeat (only edge blocks differ): let cuDNN pick kernels once per shape.
            torch.backends.cudnn.benchmark = True
        settings = pipelined(settings, devices)
        # One model cache for tasks and regions: a model loads once per device.
        self.cache = ModelCache()
        self.regions = RegionPredictor(settings, cache=self.cache, devices=self.devices)
        self.predict = PredictTaskHandler(settings, cache=self.cache, devices=self.devices)
        super().__init__(settings, {"predict": self.predict})

    def register(self, server: grpc.Server) -> None:
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.regions), server)


def build(settings: Settings) -> InferenceApp:
    return InferenceApp(settings)
