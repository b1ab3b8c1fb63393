"""Fuzzing every request message of every deep3m service over real gRPC.

All five roles run on loopback (workers off) against one store and one input
root. Hypothesis builds requests from the message descriptors — strings that
are paths and URLs pointing out of the roots, huge strings, NaN and infinite
numbers, deep and long lists — and also sends random bytes as requests.
Properties: a client mistake is never INTERNAL (or UNKNOWN); nothing is written
outside the roots; every server still answers its health check afterwards.
The number of examples sent is printed at the end of the run.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from deep3m.core.store import Store
from deep3m.runtime.healthcheck import check_health
from deep3m.runtime.server import RunningServer, create_server
from deep3m.runtime.settings import ROLES, Settings
from deep3m.testing.scheduler import save_test_model, write_volume
from deep3m.v1 import inference_pb2, postprocess_pb2, scheduler_pb2, tiling_pb2, training_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES: Counter[str] = Counter()
CALL_TIMEOUT_S = 10.0
# A client mistake must never look like a server fault.
SERVER_FAULTS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
MODULES = (scheduler_pb2, tiling_pb2, training_pb2, inference_pb2, postprocess_pb2)
ROLE_OF = {
    "Scheduler": "scheduler",
    "Tiling": "tiling",
    "Training": "training",
    "Inference": "inference",
    "Postprocess": "postprocess",
}
FUZZ = settings(
    max_examples=int(os.environ.get("DEEP3M_FUZZ_EXAMPLES", "40")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Cluster:
    servers: dict[str, RunningServer]
    channels: dict[str, grpc.Channel]
    outside: Path
    cwd_before: frozenset[str]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "inputs").mkdir()
    outside = root / "outside"
    outside.mkdir()
    s = Settings(
        store_url=f"file://{root}/store",
        input_roots=f"file://{root}/inputs",
        host="127.0.0.1",
        metrics_port=0,
        worker_enabled=False,
        rpc_timeout_seconds=CALL_TIMEOUT_S,
        device="cpu",
    )
    store = Store(s.store_url)
    write_volume(store, "volumes/in.zarr", np.zeros((2, 32, 32), np.uint8))
    save_test_model(store, "m1")
    cwd_before = frozenset(os.listdir("."))
    servers = {role: create_server(role, s, port=0, host="127.0.0.1") for role in ROLES}
    channels = {role: grpc.insecure_channel(srv.address) for role, srv in servers.items()}
    try:
        yield Cluster(servers, channels, outside, cwd_before)
    finally:
        for channel in channels.values():
            channel.close()
        for srv in servers.values():
            srv.stop(grace=1.0)


def interesting_strings(outside: Path) -> list[str]:
    return [
        "",
        ".",
        "..",
        "../../../..",
        "../outside/x.tif",
        str(outside / "x.tif"),
        f"file://{outside}/y.zarr",
        str(outside),
        "/etc/passwd",
        "s3://other-bucket/x.zarr",
        "memory://elsewhere/x",
        "volumes/in.zarr",
        "volumes/new.zarr",
        "jobs",
        "models/m1",
        "m1",
        "0",
        "1fm",
        "inference",
        "training",
        "tiff",
        "png",
        "overlay",
        "x\x00y",
        "é" * 300,
        "a" * 5000,
    ]


def scalar(fd: FieldDescriptor, strings: list[str]) -> st.SearchStrategy[Any]:
    t = fd.type
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(strings), st.text(max_size=40))
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in fd.enum_type.values])  # type: ignore[union-attr]
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(
            st.sampled_from([0.0, -1.0, 0.5, 1e300, float("nan"), float("inf")]),
            st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64),
        )
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        lo, hi = 0, 2**32 - 1
    elif t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        lo, hi = 0, 2**64 - 1
    elif t in (
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SFIXED32,
    ):
        lo, hi = -(2**31), 2**31 - 1
    else:
        lo, hi = -(2**63), 2**63 - 1
    return st.one_of(
        st.sampled_from([v for v in (0, 1, -1, 2, 3, 16, 64, 2**31 - 1, 2**62) if lo <= v <= hi]),
        st.integers(lo, hi),
    )


def message(desc: Descriptor, strings: list[str], depth: int = 0) -> st.SearchStrategy[Any]:
    cls = message_factory.GetMessageClass(desc)
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for fd in desc.fields:
        entry = fd.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key = scalar(entry.fields_by_name["key"], strings)
            value_fd = entry.fields_by_name["value"]
            value = (
                message(value_fd.message_type, strings, depth + 1)
                if value_fd.message_type is not None
                else scalar(value_fd, strings)
            )
            parts[fd.name] = st.dictionaries(key, value, max_size=3)
            continue
        if entry is not None:
            one = message(entry, strings, depth + 1) if depth < 3 else st.just(None)
        else:
            one = scalar(fd, strings)
        if fd.is_repeated:
            many = st.lists(one.filter(lambda v: v is not None), max_size=4)
            parts[fd.name] = st.one_of(many, st.just([]))
        else:
            parts[fd.name] = st.one_of(st.none(), one)

    def build(values: dict[str, Any]) -> Any:
        msg = cls()
        for name, value in values.items():
            if value is None or value == [] or value == {}:
                continue
            fd = desc.fields_by_name[name]
            target = getattr(msg, name)
            entry = fd.message_type
            if entry is not None and entry.GetOptions().map_entry:
                for k, v in value.items():
                    if entry.fields_by_name["value"].message_type is not None:
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif fd.is_repeated:
                target.extend(value)
            elif entry is not None:
                target.CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries(parts).map(build)


def methods() -> list[MethodDescriptor]:
    return [
        m
        for mod in MODULES
        for service in mod.DESCRIPTOR.services_by_name.values()
        for m in service.methods
    ]


def invoke(cluster: Cluster, method: MethodDescriptor, payload: bytes) -> grpc.StatusCode:
    channel = cluster.channels[ROLE_OF[method.containing_service.name]]
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path)(payload, timeout=CALL_TIMEOUT_S)
            for _n, _item in zip(range(3), stream, strict=False):
                pass
            stream.cancel()
        else:
            channel.unary_unary(path)(payload, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as err:
        code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
        assert code not in SERVER_FAULTS, (
            f"{path} answered {code}: {err.details() if isinstance(err, grpc.Call) else err}"
        )
        return code
    return grpc.StatusCode.OK


def written_outside(cluster: Cluster) -> list[str]:
    stray = [str(p) for p in cluster.outside.rglob("*")]
    stray += sorted(set(os.listdir(".")) - cluster.cwd_before)
    return stray


@pytest.mark.parametrize("method", methods(), ids=lambda m: f"{m.containing_service.name}.{m.name}")
def test_requests_never_fault_the_server_or_escape_the_roots(
    cluster: Cluster, method: MethodDescriptor
) -> None:
    strings = interesting_strings(cluster.outside)

    @FUZZ
    @given(request=message(method.input_type, strings))
    def run(request: Any) -> None:
        EXAMPLES[method.full_name] += 1
        invoke(cluster, method, request.SerializeToString())
        assert written_outside(cluster) == []

    run()


@FUZZ
@given(method=st.sampled_from(methods()), payload=st.binary(max_size=256))
def test_random_bytes_are_refused_cleanly(
    cluster: Cluster, method: MethodDescriptor, payload: bytes
) -> None:
    EXAMPLES["random bytes"] += 1
    invoke(cluster, method, payload)


def test_every_server_is_still_healthy(cluster: Cluster) -> None:
    for role, server in cluster.servers.items():
        assert check_health(server.address) == "SERVING", role
    assert written_outside(cluster) == []
    assert EXAMPLES, "the fuzz tests above sent nothing"
