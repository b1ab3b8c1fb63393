"""The postprocess role: the ``Postprocess`` service plus a worker for ``finalize`` tasks."""

from __future__ import annotations

import functools
import os
from typing import Any

import grpc

from deep3m.core.locations import StoreRoots
from deep3m.postprocess.service import SERVICE_NAME, PostprocessServicer
from deep3m.postprocess.tasks import handle_finalize_predict
from deep3m.runtime.settings import Settings
from deep3m.v1 import postprocess_pb2_grpc


class PostprocessApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Blockwise passes are numpy/scipy and zarr I/O, which release the GIL.
        block_threads = max(1, min(4, os.cpu_count() or 1))
        self.servicer = PostprocessServicer(
            StoreRoots.from_settings(settings),
            restrict_local=settings.restrict_local_inputs,
            max_workers=block_threads,
        )
        self.handlers = {"finalize": functools.partial(handle_finalize_predict, settings=settings)}
        self._worker: Any = None

    def register(self, server: grpc.Server) -> None:
        postprocess_pb2_grpc.add_PostprocessServicer_to_server(self.servicer, server)

    def start(self) -> None:
        if not self.settings.worker_enabled:
            return
        from deep3m.runtime.worker import Worker  # only roles that pull tasks need it

        self._worker = Worker(self.settings, "postprocess", self.handlers)
        self._worker.start()

    def stop(self, grace: float) -> None:
        if self._worker is not None:
            self._worker.stop(grace)
            self._worker = None


def build(settings: Settings) -> PostprocessApp:
    return PostprocessApp(settings)
