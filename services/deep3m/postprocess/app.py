"""The postprocess role: the ``Postprocess`` service plus a worker for ``finalize`` tasks
and the sharded labelling stages."""

from __future__ import annotations

import functools
import os

import grpc

from deep3m.core.locations import StoreRoots
from deep3m.postprocess.labelling_tasks import labelling_handlers
from deep3m.postprocess.service import SERVICE_NAME, PostprocessServicer
from deep3m.postprocess.tasks import handle_finalize_predict
from deep3m.runtime.server import WorkerRoleApp
from deep3m.runtime.settings import Settings
from deep3m.v1 import postprocess_pb2_grpc


class PostprocessApp(WorkerRoleApp):
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            settings,
            {
                "finalize": functools.partial(handle_finalize_predict, settings=settings),
                **labelling_handlers(settings),
            },
        )
        # Blockwise passes are numpy/scipy and zarr I/O, which release the GIL.
        block_threads = max(1, min(4, os.cpu_count() or 1))
        self.servicer = PostprocessServicer(
            StoreRoots.from_settings(settings),
            restrict_local=settings.restrict_local_inputs,
            max_workers=block_threads,
        )

    def register(self, server: grpc.Server) -> None:
        postprocess_pb2_grpc.add_PostprocessServicer_to_server(self.servicer, server)


def build(settings: Settings) -> PostprocessApp:
    return PostprocessApp(settings)
