"""gRPC servicer of the inference role: ``PredictRegion`` over :mod:`.region`."""

from __future__ import annotations

import grpc
import numpy as np

from deep3m.inference.region import RegionPredictor
from deep3m.inference.tasks import box_from_proto
from deep3m.v1 import inference_pb2, inference_pb2_grpc

SERVICE_NAME: str = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, regions: RegionPredictor) -> None:
        self.regions = regions

    def PredictRegion(
        self, request: inference_pb2.PredictRegionRequest, context: grpc.ServicerContext
    ) -> inference_pb2.PredictRegionResponse:
        probabilities = self.regions.predict(
            store_url=request.input.store_url,
            path=request.input.path,
            array=request.input.array,
            region=box_from_proto(request.region, "region"),
            model=request.model,
            tta_level=request.tta_level,
            members=list(request.members),
        )
        return inference_pb2.PredictRegionResponse(
            shape=list(probabilities.shape),
            probabilities=np.ascontiguousarray(probabilities, dtype="<f4").tobytes(),
        )
