"""Predict a small region interactively through an inference server's ``PredictRegion``.

Unlike a predict job this returns the voxels: the server bounds the region by
``DEEP3M_MAX_REGION_VOXELS`` and answers RESOURCE_EXHAUSTED (raised here as
``ResourceExhaustedError``) beyond it.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np

from deep3m.core.errors import InvalidArgumentError
from deep3m.runtime.channel import ChannelSecurity, connect
from deep3m.runtime.rpc_errors import from_rpc_error
from deep3m.v1 import common_pb2, inference_pb2, inference_pb2_grpc


def parse_region(text: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``"z0:z1,y0:y1,x0:x1"`` → (start, stop)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        pairs = [tuple(int(v) for v in p.split(":")) for p in parts]
    except ValueError:
        pairs = []
    if len(pairs) != 3 or any(len(p) != 2 for p in pairs):
        raise InvalidArgumentError(
            f"region {text!r} must look like z0:z1,y0:y1,x0:x1", field="region"
        )
    start = (pairs[0][0], pairs[1][0], pairs[2][0])
    stop = (pairs[0][1], pairs[1][1], pairs[2][1])
    return start, stop


def predict_region(
    address: str,
    input_path: str,
    start: Sequence[int],
    stop: Sequence[int],
    *,
    model: str,
    tta_level: int = 0,
    members: Sequence[str] = (),
    store_url: str = "",
    timeout_s: float = 300.0,
    security: ChannelSecurity | None = None,
) -> np.ndarray:
    """Foreground probability (float32, z, y, x) of ``[start, stop)`` of a volume."""
    request = inference_pb2.PredictRegionRequest(
        input=common_pb2.VolumeRef(store_url=store_url, path=input_path),
        region=common_pb2.Box(start=[int(v) for v in start], stop=[int(v) for v in stop]),
        model=model,
        tta_level=tta_level,
        members=list(members),
    )
    channel = connect(address, timeout_s=min(timeout_s, 30.0), security=security)
    try:
        reply = inference_pb2_grpc.InferenceStub(channel).PredictRegion(request, timeout=timeout_s)
    except grpc.RpcError as err:
        raise from_rpc_error(err, address=address) from None
    finally:
        channel.close()
    shape = tuple(int(s) for s in reply.shape)
    return np.frombuffer(reply.probabilities, dtype="<f4").reshape(shape).astype(np.float32)
