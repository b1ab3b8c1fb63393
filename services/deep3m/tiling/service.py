"""gRPC servicer of the tiling role: protos in, :mod:`.operations` calls, protos out."""

from __future__ import annotations

import threading

import grpc

from deep3m.core.geometry import Block, Box
from deep3m.runtime.metrics import INGEST_BYTES
from deep3m.tiling.operations import TilingOperations
from deep3m.v1 import common_pb2, tiling_pb2, tiling_pb2_grpc

SERVICE_NAME: str = tiling_pb2.DESCRIPTOR.services_by_name["Tiling"].full_name


def box_to_proto(box: Box) -> common_pb2.Box:
    return common_pb2.Box(start=list(box.start), stop=list(box.stop))


def block_to_proto(block: Block) -> common_pb2.Block:
    return common_pb2.Block(core=box_to_proto(block.core), read=box_to_proto(block.read))


class TilingServicer(tiling_pb2_grpc.TilingServicer):
    def __init__(self, operations: TilingOperations) -> None:
        self.ops = operations

    def Ingest(
        self, request: tiling_pb2.IngestRequest, context: grpc.ServicerContext
    ) -> tiling_pb2.IngestResponse:
        spec = request.spec
        # A caller that gives up (deadline, cancel) stops the ingest; its partial
        # volume is removed like after any failure.
        gone = threading.Event()
        context.add_callback(gone.set)
        store, result = self.ops.ingest(
            spec.source,
            spec.output.store_url,
            spec.output.path,
            voxel_size_nm=list(spec.voxel_size_nm),
            chunk_shape=list(spec.chunk_shape),
            shard_shape=list(spec.shard_shape),
            slices_per_task=spec.slices_per_task,
            cancelled=gone,
        )
        INGEST_BYTES.inc(result.bytes_written)
        return tiling_pb2.IngestResponse(
            volume=common_pb2.VolumeRef(store_url=store.url, path=result.path),
            shape=list(result.shape),
            dtype=result.dtype,
            seconds=result.seconds,
            bytes_written=result.bytes_written,
        )

    def Describe(
        self, request: tiling_pb2.DescribeRequest, context: grpc.ServicerContext
    ) -> tiling_pb2.VolumeDescription:
        ref = request.volume
        desc = self.ops.describe(ref.store_url, ref.path, ref.array, request.histogram_bins)
        stats = desc.statistics.statistics
        return tiling_pb2.VolumeDescription(
            volume=common_pb2.VolumeRef(store_url=desc.store_url, path=desc.path, array=desc.array),
            shape=list(desc.info.shape),
            dtype=desc.info.dtype,
            voxel_size_nm=list(desc.info.voxel_size_nm),
            chunk_shape=list(desc.info.chunk_shape),
            shard_shape=list(desc.info.shard_shape or ()),
            statistics=tiling_pb2.IntensityStatistics(
                min=stats.min,
                max=stats.max,
                mean=stats.mean,
                std=stats.std,
                p01=stats.p01,
                p50=stats.p50,
                p99=stats.p99,
            ),
            histogram=tiling_pb2.Histogram(
                edges=list(desc.statistics.histogram.edges),
                counts=list(desc.statistics.histogram.counts),
            ),
        )

    def PlanBlocks(
        self, request: tiling_pb2.PlanBlocksRequest, context: grpc.ServicerContext
    ) -> tiling_pb2.PlanBlocksResponse:
        ref = request.volume
        page = self.ops.plan_blocks(
            ref.store_url,
            ref.path,
            ref.array,
            block_shape=list(request.block_shape),
            halo=list(request.halo),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return tiling_pb2.PlanBlocksResponse(
            blocks=[block_to_proto(b) for b in page.blocks],
            total_blocks=page.total_blocks,
            grid_shape=list(page.grid_shape),
            next_page_token=page.next_page_token,
        )
