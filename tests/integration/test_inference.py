"""The inference role on real stores and a real gRPC server (loopback, port 0).

Predict tasks run through ``PredictTaskHandler`` exactly as the worker calls
it; ``PredictRegion`` through the role's server built by ``deep3m.inference.app``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from deep3m.client.client import Deep3mClient
from deep3m.client.region import parse_region, predict_region
from deep3m.core.errors import (
    CancelledError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from deep3m.core.geometry import Block, Box, plan_blocks
from deep3m.core.store import Store
from deep3m.inference.cache import ModelCache
from deep3m.inference.predictor import EnsemblePredictor, whole_volume_block
from deep3m.inference.service import SERVICE_NAME
from deep3m.inference.tasks import PredictTaskHandler, box_from_proto
from deep3m.models.card import MemberCard, ModelCard, load_state_dict, save_model
from deep3m.models.registry import build_network
from deep3m.runtime.interceptor import error_detail
from deep3m.runtime.server import RunningServer, create_server
from deep3m.runtime.settings import Settings
from deep3m.runtime.worker import TaskContext, TaskResult
from deep3m.testing.nets import LocalNet
from deep3m.testing.seaweed import SeaweedServer, free_port
from deep3m.testing.volumes import write_volume
from deep3m.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

FRAMES = {"1fm": 1, "3fm": 3, "5fm": 5}
CHUNKS = (4, 32, 32)
HALO = (2, 8, 8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_settings(store_url: str, **extra: object) -> Settings:
    return Settings(
        store_url=store_url,
        worker_enabled=False,
        device="cpu",
        metrics_port=0,
        batch_size=4,
        **extra,
    )  # type: ignore[arg-type]


def local_loader(store: Store, card: ModelCard, member: str, device: torch.device) -> nn.Module:
    """Loads LocalNet weights saved in the store (a network with a bounded receptive field)."""
    net = LocalNet(card.member(member).frames)
    net.load_state_dict(load_state_dict(store, card, member), strict=True)
    return net.to(device).eval()


def save_local_model(store: Store, model_id: str = "local") -> ModelCard:
    card = ModelCard(
        id=model_id,
        members=tuple(MemberCard(name=m, frames=f) for m, f in FRAMES.items()),
        normalization_mean=120.0,
        normalization_std=40.0,
        halo=HALO,
        input_multiple=16,
    )
    weights = {m: LocalNet(f, seed=f).state_dict() for m, f in FRAMES.items()}
    return save_model(store, card, weights)


def save_deepem3d(store: Store, model_id: str = "tiny") -> ModelCard:
    torch.manual_seed(0)
    card = ModelCard(
        id=model_id,
        architecture="deepem3d",
        width=0.0625,
        members=(MemberCard(name="1fm", frames=1), MemberCard(name="3fm", frames=3)),
        normalization_mean=120.0,
        normalization_std=40.0,
        halo=(1, 16, 16),
        input_multiple=16,
    )
    weights = {
        m.name: build_network("deepem3d", frames=m.frames, width=card.width).state_dict()
        for m in card.members
    }
    return save_model(store, card, weights)


def predict_lease(
    block: Block,
    *,
    model: str,
    tta_level: int = 10,
    members: tuple[str, ...] = (),
    input_path: str = "volumes/in.zarr",
    output_path: str = "volumes/out.zarr",
    store_url: str = "",
) -> common_pb2.TaskLease:
    spec = common_pb2.JobSpec(
        predict=common_pb2.PredictSpec(
            input=common_pb2.VolumeRef(store_url=store_url, path=input_path),
            output=common_pb2.VolumeRef(store_url=store_url, path=output_path),
            model=model,
            tta_level=tta_level,
            members=list(members),
        )
    )
    task = common_pb2.Task(
        id=f"predict/{block.id}",
        job_id="job1",
        stage="predict",
        role="inference",
        block=common_pb2.Block(
            core=common_pb2.Box(start=block.core.start, stop=block.core.stop),
            read=common_pb2.Box(start=block.read.start, stop=block.read.stop),
        ),
    )
    return common_pb2.TaskLease(task=task, spec=spec, lease_id=f"lease-{block.id}")


def chunk_files(store: Store, key: str) -> list[str]:
    return sorted(f for f in store.walk_files(f"{key}/0/c"))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


@pytest.fixture(scope="module")
def synthetic() -> np.ndarray:
    rng = np.random.default_rng(11)
    return rng.integers(0, 256, size=(14, 80, 80), dtype=np.uint8)


def test_tasks_over_every_block_equal_one_whole_volume_pass(
    store: Store, synthetic: np.ndarray
) -> None:
    """Seamlessness through the real task path: 4×3×3 blocks of 4×32×32 over 14×80×80 (edge
    blocks clipped in every axis) on a real zarr store, each task reading core+halo and
    writing its core."""
    write_volume(store, "volumes/in.zarr", synthetic, CHUNKS)
    store.create_volume("volumes/out.zarr", synthetic.shape, "float32", chunk_shape=CHUNKS)
    card = save_local_model(store)
    cache = ModelCache(local_loader)
    handler = PredictTaskHandler(make_settings(store.url), cache=cache)
    plan = plan_blocks(synthetic.shape, CHUNKS, HALO, grid=CHUNKS)
    assert plan.grid_shape == (4, 3, 3)
    voxels = 0.0
    for block in plan:
        metrics = handler.run(predict_lease(block, model="local", tta_level=2))
        assert metrics["voxels"] == block.core.size
        voxels += metrics["voxels"]
    assert voxels == synthetic.size
    assert cache.loads == 1  # the model was loaded once and reused by every task
    out = np.asarray(store.open_volume("volumes/out.zarr", require_complete=False)[...])
    members = {m: local_loader(store, card, m, torch.device("cpu")) for m in FRAMES}
    whole = EnsemblePredictor(card, members, tta_level=2).predict_block(
        synthetic, whole_volume_block(synthetic.shape, HALO)
    )
    np.testing.assert_allclose(out, whole, rtol=1e-5, atol=2e-6)


def test_task_writes_only_its_core_and_retries_rewrite_the_same_bytes(
    store: Store, synthetic: np.ndarray
) -> None:
    data = synthetic[:12, :64, :96]
    write_volume(store, "volumes/in.zarr", data, CHUNKS)
    out = store.create_volume("volumes/out.zarr", data.shape, "float32", chunk_shape=CHUNKS)
    card = save_deepem3d(store)
    handler = PredictTaskHandler(make_settings(store.url))
    block = plan_blocks(data.shape, CHUNKS, card.halo, grid=CHUNKS).block_at((1, 1, 1))
    handler.run(predict_lease(block, model="tiny", tta_level=4))
    written = np.asarray(out[...])
    # Exactly the core's chunk was stored; everything else is still the fill value.
    assert chunk_files(store, "volumes/out.zarr") == ["volumes/out.zarr/0/c/1/1/1"]
    outside = np.ones(data.shape, bool)
    outside[block.core.slices()] = False
    assert (written[outside] == 0).all()
    core = written[block.core.slices()]
    assert ((core > 0) & (core < 1)).all()
    # The same as predicting that block in process with the same networks.
    nets = {
        m: build_network("deepem3d", frames=f, width=card.width)
        for m, f in (("1fm", 1), ("3fm", 3))
    }
    for m, net in nets.items():
        net.load_state_dict(load_state_dict(store, card, m))
        net.eval()
    want = EnsemblePredictor(card, nets, tta_level=4).predict_block(data, block)
    np.testing.assert_allclose(core, want, rtol=1e-5, atol=1e-6)
    # A retried task (lease expired, say) rewrites identical bytes.
    handler.run(predict_lease(block, model="tiny", tta_level=4))
    np.testing.assert_array_equal(np.asarray(out[...]), written)


def test_members_subset_and_default_level(store: Store, synthetic: np.ndarray) -> None:
    data = synthetic[:4, :32, :32]
    write_volume(store, "volumes/in.zarr", data, CHUNKS)
    out = store.create_volume("volumes/out.zarr", data.shape, "float32", chunk_shape=CHUNKS)
    card = save_local_model(store)
    handler = PredictTaskHandler(make_settings(store.url), cache=ModelCache(local_loader))
    block = plan_blocks(data.shape, CHUNKS, HALO).block(0)
    handler.run(predict_lease(block, model="local", tta_level=0, members=("3fm",)))
    want = EnsemblePredictor(
        card, {"3fm": local_loader(store, card, "3fm", torch.device("cpu"))}, tta_level=10
    ).predict_block(data, block)
    np.testing.assert_allclose(np.asarray(out[...]), want, rtol=1e-5, atol=1e-6)


@pytest.fixture
def small_job(store: Store, synthetic: np.ndarray) -> tuple[PredictTaskHandler, Block]:
    data = synthetic[:4, :64, :64]
    write_volume(store, "volumes/in.zarr", data, CHUNKS)
    store.create_volume("volumes/out.zarr", data.shape, "float32", chunk_shape=CHUNKS)
    save_local_model(store)
    handler = PredictTaskHandler(make_settings(store.url), cache=ModelCache(local_loader))
    return handler, plan_blocks(data.shape, CHUNKS, HALO).block(0)


def test_missing_model_is_not_found_and_writes_nothing(
    store: Store, small_job: tuple[PredictTaskHandler, Block]
) -> None:
    handler, block = small_job
    with pytest.raises(NotFoundError, match="model 'nope' not found") as exc:
        handler.run(predict_lease(block, model="nope"))
    assert exc.value.field == "model" and not exc.value.retryable
    assert chunk_files(store, "volumes/out.zarr") == []


def test_misaligned_core_is_refused(
    store: Store, small_job: tuple[PredictTaskHandler, Block]
) -> None:
    handler, _ = small_job
    core = Box((0, 16, 0), (4, 48, 32))
    with pytest.raises(InvalidArgumentError, match="not aligned to the write grid") as exc:
        handler.run(predict_lease(Block((0, 0, 0), core, core.grow(HALO)), model="local"))
    assert exc.value.field == "task.block.core"
    assert chunk_files(store, "volumes/out.zarr") == []


def test_bad_task_inputs_are_named(
    store: Store, small_job: tuple[PredictTaskHandler, Block]
) -> None:
    handler, block = small_job
    with pytest.raises(InvalidArgumentError, match="no member '7fm'"):
        handler.run(predict_lease(block, model="local", members=("7fm",)))
    with pytest.raises(InvalidArgumentError, match="tta_level"):
        handler.run(predict_lease(block, model="local", tta_level=3))
    with pytest.raises(NotFoundError, match=r"volumes/missing\.zarr"):
        handler.run(predict_lease(block, model="local", input_path="volumes/missing.zarr"))
    with pytest.raises(InvalidArgumentError, match="outside the configured store roots"):
        handler.run(predict_lease(block, model="local", store_url="file:///etc"))
    store.create_volume("volumes/u8.zarr", (4, 64, 64), "uint8", chunk_shape=CHUNKS)
    with pytest.raises(InvalidArgumentError, match="dtype uint8") as exc:
        handler.run(predict_lease(block, model="local", output_path="volumes/u8.zarr"))
    assert exc.value.field == "output"
    lease = predict_lease(block, model="local")
    del lease.task.block.core.stop[:]
    with pytest.raises(InvalidArgumentError, match=r"task\.block\.core must have 3"):
        handler.run(lease)
    lease = predict_lease(block, model="local")
    lease.spec.ClearField("predict")
    with pytest.raises(InvalidArgumentError, match="empty job spec"):
        handler.run(lease)
    assert chunk_files(store, "volumes/out.zarr") == []


def test_cancelled_task_writes_nothing(
    store: Store, small_job: tuple[PredictTaskHandler, Block]
) -> None:
    handler, block = small_job
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(CancelledError):
        handler.run(predict_lease(block, model="local"), cancelled=cancelled)
    assert chunk_files(store, "volumes/out.zarr") == []


@pytest.mark.s3
def test_task_on_s3(s3_server: SeaweedServer, s3_prefix: str, synthetic: np.ndarray) -> None:
    settings = make_settings(s3_prefix, **s3_server.settings_fields())
    store = Store(s3_prefix, s3_server.storage_options)
    data = synthetic[:8, :64, :32]
    write_volume(store, "volumes/in.zarr", data, CHUNKS)
    store.create_volume("volumes/out.zarr", data.shape, "float32", chunk_shape=CHUNKS)
    card = save_local_model(store)
    handler = PredictTaskHandler(settings, cache=ModelCache(local_loader))
    plan = plan_blocks(data.shape, CHUNKS, HALO, grid=CHUNKS)
    for block in plan:
        handler.run(predict_lease(block, model="local", tta_level=10))
    members = {m: local_loader(store, card, m, torch.device("cpu")) for m in FRAMES}
    whole = EnsemblePredictor(card, members, tta_level=10).predict_block(
        data, whole_volume_block(data.shape, HALO)
    )
    out = np.asarray(store.open_volume("volumes/out.zarr", require_complete=False)[...])
    np.testing.assert_allclose(out, whole, rtol=1e-5, atol=2e-6)


# -- PredictRegion over gRPC ---------------------------------------------------------------


@pytest.fixture
def region_server(store: Store, synthetic: np.ndarray) -> Iterator[RunningServer]:
    write_volume(store, "volumes/in.zarr", synthetic[:12, :80, :80], CHUNKS)
    save_deepem3d(store)
    settings = make_settings(store.url, max_region_voxels=4 * 32 * 48)
    server = create_server("inference", settings, port=0, host="127.0.0.1")
    try:
        yield server
    finally:
        server.stop(grace=1.0)


def region_request(
    start: tuple[int, ...], stop: tuple[int, ...], *, model: str = "tiny", tta_level: int = 2
) -> inference_pb2.PredictRegionRequest:
    return inference_pb2.PredictRegionRequest(
        input=common_pb2.VolumeRef(path="volumes/in.zarr"),
        region=common_pb2.Box(start=start, stop=stop),
        model=model,
        tta_level=tta_level,
    )


def test_predict_region_over_grpc(
    store: Store, region_server: RunningServer, synthetic: np.ndarray
) -> None:
    with grpc.insecure_channel(region_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = inference_pb2_grpc.InferenceStub(channel)
        reply = stub.PredictRegion(region_request((0, 16, 16), (4, 48, 64)), timeout=60)
    assert list(reply.shape) == [4, 32, 48]
    probs = np.frombuffer(reply.probabilities, dtype="<f4").reshape(reply.shape)
    card = ModelCard.from_json(store.read_json("models/tiny/model.json"))
    nets = {}
    for m in card.members:
        net = build_network("deepem3d", frames=m.frames, width=card.width)
        net.load_state_dict(load_state_dict(store, card, m.name))
        nets[m.name] = net.eval()
    region = Box((0, 16, 16), (4, 48, 64))
    want = EnsemblePredictor(card, nets, tta_level=2).predict_block(
        synthetic[:12, :80, :80], Block((0, 0, 0), region, region.grow(card.halo))
    )
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("request_args", "code", "field", "text"),
    [
        (
            ((0, 0, 0), (8, 64, 64), "tiny"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "region",
            "region Box(start=(0, 0, 0), stop=(8, 64, 64)) of shape [8, 64, 64] has 32768 voxels",
        ),
        (
            ((0, 0, 0), (2, 16, 16), "nope"),
            grpc.StatusCode.NOT_FOUND,
            "model",
            "model 'nope' not found",
        ),
        (
            ((10, 0, 0), (14, 16, 16), "tiny"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "region",
            "is not inside the volume",
        ),
        (
            ((0, 0), (2, 16), "tiny"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "region",
            "region must have 3 start and 3 stop values",
        ),
    ],
)
def test_predict_region_errors(
    region_server: RunningServer,
    request_args: tuple[tuple[int, ...], tuple[int, ...], str],
    code: grpc.StatusCode,
    field: str,
    text: str,
) -> None:
    start, stop, model = request_args
    with grpc.insecure_channel(region_server.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as exc:
            stub.PredictRegion(region_request(start, stop, model=model), timeout=30)
    err = exc.value
    assert err.code() == code  # type: ignore[attr-defined]
    assert text in err.details()  # type: ignore[attr-defined]
    detail = error_detail(err)
    assert detail is not None and detail.field == field


def test_region_client_function(region_server: RunningServer) -> None:
    start, stop = parse_region("0:2, 16:48, 16:32")
    assert (start, stop) == ((0, 16, 16), (2, 48, 32))
    probs = predict_region(region_server.address, "volumes/in.zarr", start, stop, model="tiny")
    assert probs.shape == (2, 32, 16) and probs.dtype == np.float32
    assert ((probs > 0) & (probs < 1)).all()
    with pytest.raises(ResourceExhaustedError, match="interactive limit") as exc:
        predict_region(
            region_server.address, "volumes/in.zarr", (0, 0, 0), (8, 64, 64), model="tiny"
        )
    assert exc.value.field == "region"
    for bad in ("0:2,16:48", "a:b,1:2,3:4", "0:2:4,1:2,3:4"):
        with pytest.raises(InvalidArgumentError, match="z0:z1,y0:y1,x0:x1"):
            parse_region(bad)


@pytest.mark.data
def test_predict_region_on_real_em(data_dir: Path, store: Store) -> None:
    from PIL import Image

    folder = data_dir / "cdeep3m-mito" / "training" / "images"
    slices = [np.asarray(Image.open(p)) for p in sorted(folder.glob("images.*.png"))[:6]]
    stack = np.stack(slices)[:, :256, :256]
    write_volume(store, "volumes/in.zarr", stack.astype(np.uint8), CHUNKS)
    save_deepem3d(store)
    server = create_server("inference", make_settings(store.url), port=0, host="127.0.0.1")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            reply = stub.PredictRegion(region_request((2, 64, 64), (4, 192, 192)), timeout=60)
    finally:
        server.stop(grace=1.0)
    probs = np.frombuffer(reply.probabilities, dtype="<f4").reshape(reply.shape)
    assert probs.shape == (2, 128, 128)
    assert np.isfinite(probs).all() and ((probs > 0) & (probs < 1)).all()
    assert probs.std() > 0  # depends on the image, not a constant


def test_every_level_member_combination_runs(store: Store, synthetic: np.ndarray) -> None:
    """Each speed level with each member subset yields a probability map of the core."""
    data = synthetic[:4, :32, :32]
    write_volume(store, "volumes/in.zarr", data, CHUNKS)
    out = store.create_volume("volumes/out.zarr", data.shape, "float32", chunk_shape=CHUNKS)
    save_local_model(store)
    handler = PredictTaskHandler(make_settings(store.url), cache=ModelCache(local_loader))
    block = plan_blocks(data.shape, CHUNKS, HALO).block(0)
    seen = []
    for level, members in itertools.product((1, 2, 4, 10), (("1fm",), ("5fm",))):
        handler.run(predict_lease(block, model="local", tta_level=level, members=members))
        seen.append(np.asarray(out[...]))
        assert ((seen[-1] >= 0) & (seen[-1] <= 1)).all() and seen[-1].std() > 0
    assert len({s.tobytes() for s in seen}) == len(seen)  # every combination differs


# -- the worker: a real Worker against a scheduler stand-in on loopback --------------------


class LeaseQueue(scheduler_pb2_grpc.SchedulerServicer):
    """Hands out the queued leases once and records what the worker reports."""

    def __init__(self, leases: list[common_pb2.TaskLease]) -> None:
        self.pending = list(leases)
        self.completed: dict[str, scheduler_pb2.CompleteTaskRequest] = {}
        self.failed: dict[str, scheduler_pb2.FailTaskRequest] = {}
        self.all_reported = threading.Event()
        self._total = len(leases)
        self._lock = threading.Lock()

    def LeaseTasks(
        self, request: scheduler_pb2.LeaseTasksRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.LeaseTasksResponse:
        with self._lock:
            assert request.role == "inference"
            given, self.pending = (
                self.pending[: request.max_tasks],
                self.pending[request.max_tasks :],
            )
        for lease in given:
            lease.deadline_unix_s = time.time() + 60
        return scheduler_pb2.LeaseTasksResponse(leases=given)

    def RenewLease(
        self, request: scheduler_pb2.RenewLeaseRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.RenewLeaseResponse:
        return scheduler_pb2.RenewLeaseResponse(deadline_unix_s=time.time() + 60)

    def _reported(self) -> None:
        if len(self.completed) + len(self.failed) == self._total:
            self.all_reported.set()

    def CompleteTask(
        self, request: scheduler_pb2.CompleteTaskRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.CompleteTaskResponse:
        with self._lock:
            self.completed[request.lease_id] = request
            self._reported()
        return scheduler_pb2.CompleteTaskResponse()

    def FailTask(
        self, request: scheduler_pb2.FailTaskRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.FailTaskResponse:
        with self._lock:
            self.failed[request.lease_id] = request
            self._reported()
        return scheduler_pb2.FailTaskResponse(quarantined=not request.retryable)


def test_inference_role_worker_runs_predict_tasks(store: Store, synthetic: np.ndarray) -> None:
    data = synthetic[:8, :64, :64]
    write_volume(store, "volumes/in.zarr", data, CHUNKS)
    out = store.create_volume("volumes/out.zarr", data.shape, "float32", chunk_shape=CHUNKS)
    save_deepem3d(store)
    plan = plan_blocks(data.shape, CHUNKS, (1, 16, 16), grid=CHUNKS)
    good = [predict_lease(b, model="tiny") for b in plan]
    bad = predict_lease(plan.block(0), model="nope")
    bad.lease_id = "lease-missing-model"
    queue = LeaseQueue([*good, bad])
    scheduler = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(queue, scheduler)
    port = scheduler.add_insecure_port("127.0.0.1:0")
    scheduler.start()
    settings = Settings(
        store_url=store.url,
        device="cpu",
        metrics_port=0,
        scheduler_address=f"127.0.0.1:{port}",
        poll_interval_seconds=0.05,
        worker_capacity=2,
    )
    role = create_server("inference", settings, port=0, host="127.0.0.1")
    try:
        assert queue.all_reported.wait(120), "the worker did not report every task"
    finally:
        role.stop(grace=5.0)
        scheduler.stop(0)
    assert set(queue.completed) == {lease.lease_id for lease in good}
    for lease in good:
        core = box_from_proto(lease.task.block.core, "core")
        assert queue.completed[lease.lease_id].metrics["voxels"] == core.size
    failure = queue.failed["lease-missing-model"]
    assert not failure.retryable
    assert failure.error.code == "NOT_FOUND" and failure.error.field == "model"
    assert "'nope'" in failure.error.message
    result = np.asarray(out[...])
    assert ((result > 0) & (result < 1)).all()  # every block was written


def test_handler_called_with_a_worker_context(store: Store, synthetic: np.ndarray) -> None:
    data = synthetic[:4, :32, :32]
    write_volume(store, "volumes/in.zarr", data, CHUNKS)
    out = store.create_volume("volumes/out.zarr", data.shape, "float32", chunk_shape=CHUNKS)
    save_deepem3d(store)
    block = plan_blocks(data.shape, CHUNKS, (1, 16, 16)).block(0)
    ctx = TaskContext(
        predict_lease(block, model="tiny"), worker_id="w1", settings=make_settings(store.url)
    )
    result = PredictTaskHandler(make_settings(store.url))(ctx)
    assert isinstance(result, TaskResult)
    assert result.metrics["voxels"] == data.size and result.metrics["seconds"] > 0
    assert ((np.asarray(out[...]) > 0) & (np.asarray(out[...]) < 1)).all()


def test_predict_job_through_the_scheduler(store: Store, synthetic: np.ndarray) -> None:
    """A predict job on the real scheduler: every block the planner made is predicted by
    the inference role's worker exactly as in process, core + halo for core."""
    data = synthetic[:8, :64, :96]
    write_volume(store, "volumes/in.zarr", data, CHUNKS)
    card = save_deepem3d(store)
    port = free_port()
    settings = Settings(
        store_url=store.url,
        device="cpu",
        metrics_port=0,
        scheduler_address=f"127.0.0.1:{port}",
        poll_interval_seconds=0.05,
    )
    scheduler = create_server("scheduler", settings, port=port, host="127.0.0.1")
    role = create_server("inference", settings, port=0, host="127.0.0.1")
    try:
        with Deep3mClient(scheduler.address) as client:
            job = client.predict(
                "volumes/in.zarr", "tiny", "volumes/out.zarr", tta_level=10, block_shape=(4, 32, 32)
            )
            for event in client.watch(job.id, timeout_s=120):
                if event.terminal or event.stage not in ("", "predict"):
                    break
            final = client.get(job.id)
    finally:
        role.stop(grace=5.0)
        scheduler.stop(grace=1.0)
    stage = next(s for s in final.stages if s.name == "predict")
    assert stage.tasks_total == 2 * 2 * 3 and stage.tasks_done == stage.tasks_total
    spec = final.spec.predict
    out = np.asarray(store.open_volume("volumes/out.zarr", require_complete=False)[...])
    nets = {}
    for m in card.members:
        net = build_network("deepem3d", frames=m.frames, width=card.width)
        net.load_state_dict(load_state_dict(store, card, m.name))
        nets[m.name] = net.eval()
    predictor = EnsemblePredictor(card, nets, tta_level=10)
    for block in plan_blocks(data.shape, tuple(spec.block_shape), tuple(spec.halo)):
        want = predictor.predict_block(data, block)
        np.testing.assert_allclose(out[block.core.slices()], want, rtol=1e-5, atol=1e-6)
