"""The tiling role over real gRPC on loopback, real stores (file://, SeaweedFS S3) and real data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tifffile
from deep3m.core.errors import NotFoundError
from deep3m.core.grey_levels import GreyLevels, recorded_levels
from deep3m.core.imageio import open_source
from deep3m.core.ingest import create_ingest_volume, plan_ingest
from deep3m.core.store import Store
from deep3m.core.store.keys import ingest_documents
from deep3m.runtime.interceptor import error_detail
from deep3m.runtime.server import RunningServer, create_server
from deep3m.runtime.settings import Settings
from deep3m.testing.seaweed import SeaweedServer, free_port
from deep3m.tiling.tasks import IngestTaskHandlers
from deep3m.v1 import common_pb2, tiling_pb2, tiling_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(5)


@dataclass
class Tiling:
    stub: tiling_pb2_grpc.TilingStub
    settings: Settings
    store: Store
    server: RunningServer


def make_settings(store_url: str, **extra: object) -> Settings:
    values: dict[str, object] = {
        "store_url": store_url,
        "worker_enabled": False,
        "metrics_port": 0,
        "host": "127.0.0.1",
        # These tests ingest from their temporary folders; the confinement of
        # local paths is tested with it on (test_restricted_local_inputs_...).
        "restrict_local_inputs": False,
    }
    values.update(extra)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def serve() -> Iterator[object]:
    running: list[tuple[RunningServer, grpc.Channel]] = []

    def start(settings: Settings) -> Tiling:
        server = create_server("tiling", settings, port=0, host="127.0.0.1")
        channel = grpc.insecure_channel(server.address)
        running.append((server, channel))
        roots_store = Store(
            settings.store_url,
            settings.storage_options() if settings.store_url.startswith("s3://") else None,
        )
        return Tiling(tiling_pb2_grpc.TilingStub(channel), settings, roots_store, server)

    yield start
    for server, channel in running:
        channel.close()
        server.stop(0)


@pytest.fixture
def tiling(tmp_path: Path, serve) -> Tiling:  # type: ignore[no-untyped-def]
    return serve(make_settings(f"file://{tmp_path / 'store'}"))


def ingest_request(
    source: str | Path, path: str = "volumes/v.zarr", store_url: str = "", **spec: object
) -> tiling_pb2.IngestRequest:
    fields: dict[str, object] = {"voxel_size_nm": [40.0, 5.9, 5.9]}
    fields.update(spec)
    return tiling_pb2.IngestRequest(
        spec=common_pb2.IngestSpec(
            source=str(source),
            output=common_pb2.VolumeRef(store_url=store_url, path=path),
            **fields,
        )
    )  # type: ignore[arg-type]


def pil_stack(folder: Path) -> np.ndarray:
    """The reference: every page read raw by Pillow (palette indices stay indices)."""
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def stored_files(store: Store) -> list[str]:
    return list(store.walk_files(""))


# -- the done criterion: real data in, exact pixels out ---------------------------------
@pytest.mark.data
@pytest.mark.s3
def test_mito_training_stack_into_s3_reads_back_exactly(
    data_dir: Path, s3_server: SeaweedServer, serve, s3_prefix: str
) -> None:
    settings = make_settings(s3_prefix, **s3_server.settings_fields())
    t = serve(settings)
    for kind in ("images", "labels"):
        folder = data_dir / "cdeep3m-mito" / "training" / kind
        reply = t.stub.Ingest(ingest_request(folder, f"volumes/mito-{kind}.zarr"), timeout=120)
        assert list(reply.shape) == [20, 1024, 1024] and reply.dtype == "uint8"
        assert reply.volume.store_url == s3_prefix
        # Read back through a separate client of the S3 server.
        fresh = Store(s3_prefix, s3_server.storage_options)
        stored = fresh.open_volume(f"volumes/mito-{kind}.zarr")[:]
        np.testing.assert_array_equal(stored, pil_stack(folder))
    labels = fresh.open_volume("volumes/mito-labels.zarr")[:]
    assert set(np.unique(labels)) == {0, 1}


@pytest.mark.data
def test_isbi_stack_into_file_store_reads_back_exactly(data_dir: Path, tiling: Tiling) -> None:
    folder = data_dir / "isbi2012" / "train" / "images"
    reply = tiling.stub.Ingest(
        ingest_request(
            folder,
            "volumes/isbi.zarr",
            voxel_size_nm=[50.0, 4.0, 4.0],
            chunk_shape=[8, 128, 128],
            shard_shape=[8, 512, 512],
        ),
        timeout=120,
    )
    assert list(reply.shape) == [30, 512, 512] and reply.bytes_written == 30 * 512 * 512
    reference = pil_stack(folder)
    np.testing.assert_array_equal(tiling.store.open_volume("volumes/isbi.zarr")[:], reference)

    desc = tiling.stub.Describe(
        tiling_pb2.DescribeRequest(
            volume=common_pb2.VolumeRef(path="volumes/isbi.zarr"), histogram_bins=64
        ),
        timeout=60,
    )
    assert list(desc.voxel_size_nm) == [50.0, 4.0, 4.0]
    assert list(desc.chunk_shape) == [8, 128, 128] and list(desc.shard_shape) == [8, 512, 512]
    s = desc.statistics
    assert (s.min, s.max) == (reference.min(), reference.max())
    assert s.mean == pytest.approx(reference.mean(), rel=1e-9)
    assert s.std == pytest.approx(reference.std(), rel=1e-9)
    assert (s.p01, s.p50, s.p99) == tuple(np.percentile(reference, [1, 50, 99]))
    counts, edges = np.histogram(reference, bins=64, range=(reference.min(), reference.max()))
    assert list(desc.histogram.counts) == list(counts)
    np.testing.assert_allclose(desc.histogram.edges, edges)


# -- block planning ----------------------------------------------------------------------
def small_volume(store: Store, shape: tuple[int, int, int] = (10, 40, 36)) -> str:
    arr = store.create_volume("volumes/p.zarr", shape, "uint8", chunk_shape=(2, 8, 12))
    arr[:] = 1
    store.mark_complete("volumes/p.zarr")
    return "volumes/p.zarr"


def test_plan_blocks_pages_through_every_block_once(tiling: Tiling) -> None:
    path = small_volume(tiling.store)
    request = tiling_pb2.PlanBlocksRequest(
        volume=common_pb2.VolumeRef(path=path), block_shape=[4, 16, 24], halo=[1, 3, 3], page_size=7
    )
    coverage = np.zeros((10, 40, 36), dtype=np.int32)
    pages = 0
    seen = 0
    while True:
        reply = tiling.stub.PlanBlocks(request, timeout=10)
        pages += 1
        assert reply.total_blocks == 3 * 3 * 2 and list(reply.grid_shape) == [3, 3, 2]
        for block in reply.blocks:
            core = tuple(
                slice(a, b) for a, b in zip(block.core.start, block.core.stop, strict=True)
            )
            coverage[core] += 1
            assert [a - 1 for a in block.core.start[:1]] == list(block.read.start[:1])
            seen += 1
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    assert pages == 3 and seen == 18
    assert (coverage == 1).all()
    # Default block: one chunk.
    reply = tiling.stub.PlanBlocks(
        tiling_pb2.PlanBlocksRequest(volume=common_pb2.VolumeRef(path=path)), timeout=10
    )
    assert reply.total_blocks == 5 * 5 * 3 and list(reply.blocks[0].core.stop) == [2, 8, 12]


@pytest.mark.parametrize("block", [[0, 16, 24], [4, -8, 24], [3, 16, 24], [4, 16]])
def test_bad_block_shapes_are_invalid_argument(tiling: Tiling, block: list[int]) -> None:
    path = small_volume(tiling.store)
    with pytest.raises(grpc.RpcError) as err:
        tiling.stub.PlanBlocks(
            tiling_pb2.PlanBlocksRequest(volume=common_pb2.VolumeRef(path=path), block_shape=block),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_detail(err.value).field == "block_shape"
    assert "block_shape" in err.value.details()


def test_foreign_page_token_and_bad_page_size(tiling: Tiling) -> None:
    path = small_volume(tiling.store)
    ref = common_pb2.VolumeRef(path=path)
    first = tiling.stub.PlanBlocks(
        tiling_pb2.PlanBlocksRequest(volume=ref, page_size=2), timeout=10
    )
    for request in (
        tiling_pb2.PlanBlocksRequest(
            volume=ref, block_shape=[4, 16, 24], page_token=first.next_page_token
        ),
        tiling_pb2.PlanBlocksRequest(volume=ref, page_token="9999.abc"),
        tiling_pb2.PlanBlocksRequest(volume=ref, page_size=-1),
    ):
        with pytest.raises(grpc.RpcError) as err:
            tiling.stub.PlanBlocks(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_detail(err.value).field in ("page_token", "page_size")


def test_describe_and_plan_refuse_missing_and_incomplete_volumes(tiling: Tiling) -> None:
    ref = common_pb2.VolumeRef(path="volumes/none.zarr")
    for call in (
        lambda: tiling.stub.Describe(tiling_pb2.DescribeRequest(volume=ref), timeout=10),
        lambda: tiling.stub.PlanBlocks(tiling_pb2.PlanBlocksRequest(volume=ref), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "volumes/none.zarr" in err.value.details()
    tiling.store.create_volume("volumes/half.zarr", (2, 4, 4), "uint8")
    with pytest.raises(grpc.RpcError) as err:
        tiling.stub.Describe(
            tiling_pb2.DescribeRequest(volume=common_pb2.VolumeRef(path="volumes/half.zarr")),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# -- bad input: typed status, the culprit named, nothing left behind -------------------------
def png_folder(folder: Path, z: int = 4, size: tuple[int, int] = (24, 32)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(z):
        path = folder / f"s{i:02d}.png"
        Image.fromarray(RNG.integers(0, 256, size=size, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def bad_missing_file(root: Path) -> tuple[str, str]:
    return str(root / "nowhere" / "stack.tif"), "stack.tif"


def bad_corrupt_png(root: Path) -> tuple[str, str]:
    paths = png_folder(root / "f")
    paths[1].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    return str(root / "f"), paths[1].name


def bad_truncated_png(root: Path) -> tuple[str, str]:
    paths = png_folder(root / "f")
    truncate(paths[3])
    return str(root / "f"), paths[3].name


def bad_corrupt_tiff(root: Path) -> tuple[str, str]:
    (root / "c.tif").write_bytes(b"MM\x00*" + bytes(100))
    return str(root / "c.tif"), "c.tif"


def bad_truncated_tiff(root: Path) -> tuple[str, str]:
    tifffile.imwrite(
        root / "t.tif", RNG.integers(0, 255, (6, 32, 32), dtype=np.uint8), photometric="minisblack"
    )
    truncate(root / "t.tif")
    return str(root / "t.tif"), "t.tif"


def bad_sizes(root: Path) -> tuple[str, str]:
    png_folder(root / "f")
    png_folder(root / "g", z=1, size=(24, 30))
    (root / "g" / "s00.png").rename(root / "f" / "s02.png")
    return str(root / "f"), "s02.png"


def bad_rgb(root: Path) -> tuple[str, str]:
    png_folder(root / "f", z=2)
    Image.new("RGB", (32, 24)).save(root / "f" / "s05.png")
    return str(root / "f"), "s05.png"


def bad_float(root: Path) -> tuple[str, str]:
    tifffile.imwrite(root / "f.tif", np.zeros((3, 8, 8), np.float32), photometric="minisblack")
    return str(root / "f.tif"), "f.tif"


def bad_empty_folder(root: Path) -> tuple[str, str]:
    (root / "empty").mkdir()
    return str(root / "empty"), "empty"


def bad_unknown_extension(root: Path) -> tuple[str, str]:
    (root / "scan.czi").write_bytes(b"ZISRAWFILE")
    return str(root / "scan.czi"), "scan.czi"


def bad_source_url_outside_roots(root: Path) -> tuple[str, str]:
    png_folder(root / "elsewhere")
    return f"file://{root / 'elsewhere'}", "elsewhere"


def bad_s3_url_outside_roots(root: Path) -> tuple[str, str]:
    return "s3://someone-elses-bucket/stack", "s3://someone-elses-bucket/stack"


BAD_SOURCES = {
    "missing file": (bad_missing_file, grpc.StatusCode.NOT_FOUND),
    "corrupt png": (bad_corrupt_png, grpc.StatusCode.INVALID_ARGUMENT),
    "truncated png": (bad_truncated_png, grpc.StatusCode.INVALID_ARGUMENT),
    "corrupt tiff": (bad_corrupt_tiff, grpc.StatusCode.INVALID_ARGUMENT),
    "truncated tiff": (bad_truncated_tiff, grpc.StatusCode.INVALID_ARGUMENT),
    "different sizes": (bad_sizes, grpc.StatusCode.INVALID_ARGUMENT),
    "rgb": (bad_rgb, grpc.StatusCode.INVALID_ARGUMENT),
    "float": (bad_float, grpc.StatusCode.INVALID_ARGUMENT),
    "empty folder": (bad_empty_folder, grpc.StatusCode.INVALID_ARGUMENT),
    "unknown extension": (bad_unknown_extension, grpc.StatusCode.INVALID_ARGUMENT),
    "file url outside roots": (bad_source_url_outside_roots, grpc.StatusCode.INVALID_ARGUMENT),
    "s3 url outside roots": (bad_s3_url_outside_roots, grpc.StatusCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_sources_are_refused_and_leave_nothing(
    tmp_path: Path, tiling: Tiling, case: str
) -> None:
    make, code = BAD_SOURCES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source, culprit = make(inputs)
    with pytest.raises(grpc.RpcError) as err:
        tiling.stub.Ingest(ingest_request(source), timeout=30)
    assert err.value.code() == code, err.value.details()
    assert culprit in err.value.details()
    assert stored_files(tiling.store) == []


def test_output_outside_the_store_roots_is_refused(tmp_path: Path, tiling: Tiling) -> None:
    png_folder(tmp_path / "f")
    elsewhere = f"file://{tmp_path / 'other-store'}"
    for store_url, path, named in (
        (elsewhere, "volumes/v.zarr", elsewhere),
        ("", "../escape.zarr", "../escape.zarr"),
        ("s3://not-configured/x", "v.zarr", "s3://not-configured/x"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            tiling.stub.Ingest(ingest_request(tmp_path / "f", path, store_url), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert named in err.value.details()
        assert error_detail(err.value).field.startswith("spec.output")
    assert not (tmp_path / "other-store").exists()
    assert not (tmp_path / "escape.zarr").exists()
    assert stored_files(tiling.store) == []


def test_bad_layout_and_existing_output(tmp_path: Path, tiling: Tiling) -> None:
    png_folder(tmp_path / "f", z=8)
    for spec, field in (
        ({"chunk_shape": [0, 8, 8]}, "chunk_shape"),
        ({"shard_shape": [3, 8, 8], "chunk_shape": [2, 8, 8]}, "shard_shape"),
        ({"voxel_size_nm": []}, "voxel_size_nm"),
        ({"slices_per_task": 3, "chunk_shape": [2, 8, 8]}, "slices_per_task"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            tiling.stub.Ingest(ingest_request(tmp_path / "f", **spec), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_detail(err.value).field == field
        assert field in err.value.details()
        assert stored_files(tiling.store) == []
    tiling.stub.Ingest(ingest_request(tmp_path / "f"), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        tiling.stub.Ingest(ingest_request(tmp_path / "f"), timeout=30)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "volumes/v.zarr" in err.value.details()


def test_restricted_local_inputs_must_lie_under_a_root(tmp_path: Path, serve) -> None:
    allowed = tmp_path / "allowed"
    png_folder(allowed / "stack")
    png_folder(tmp_path / "private" / "stack")
    t = serve(
        make_settings(
            f"file://{tmp_path / 'store'}",
            restrict_local_inputs=True,
            input_roots=f"file://{allowed}",
        )
    )
    with pytest.raises(grpc.RpcError) as err:
        t.stub.Ingest(ingest_request(tmp_path / "private" / "stack"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "private" in err.value.details()
    # A relative escape from an allowed root is resolved before the check.
    with pytest.raises(grpc.RpcError) as err:
        t.stub.Ingest(ingest_request(f"{allowed}/../private/stack"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reply = t.stub.Ingest(ingest_request(allowed / "stack"), timeout=30)
    assert list(reply.shape) == [4, 24, 32]


# -- worker task handlers --------------------------------------------------------------------
def lease_for(source: Path, store_url: str, stage: str, **params: str) -> common_pb2.TaskLease:
    spec = common_pb2.JobSpec(
        name="ingest",
        ingest=common_pb2.IngestSpec(
            source=str(source),
            output=common_pb2.VolumeRef(store_url=store_url, path="volumes/t.zarr"),
            voxel_size_nm=[40, 6, 6],
            chunk_shape=[2, 16, 16],
        ),
    )
    task = common_pb2.Task(
        id=f"{stage}-{params.get('z_start', 'x')}",
        job_id="j",
        stage=stage,
        role="tiling",
        params=params,
    )
    return common_pb2.TaskLease(task=task, spec=spec, lease_id="l")


def test_task_handlers_write_ranges_then_finalize(tmp_path: Path) -> None:
    png_folder(tmp_path / "f", z=5)
    store_url = f"file://{tmp_path / 'store'}"
    settings = make_settings(store_url)
    handlers = IngestTaskHandlers(settings)
    store = Store(store_url)
    spec = lease_for(tmp_path / "f", store_url, "ingest").spec.ingest
    plan = plan_ingest(
        spec.source, voxel_size_nm=list(spec.voxel_size_nm), chunk_shape=list(spec.chunk_shape)
    )
    create_ingest_volume(store, "volumes/t.zarr", plan)
    for z0, z1 in plan.z_ranges:
        metrics = handlers.run_ingest_range(
            lease_for(tmp_path / "f", store_url, "ingest", z_start=str(z0), z_stop=str(z1))
        )
        assert metrics["slices"] == z1 - z0 and metrics["bytes"] == (z1 - z0) * 24 * 32
        assert metrics["voxels"] == metrics["bytes"]  # uint8
    assert not store.volume_info("volumes/t.zarr").complete
    # Each range left its grey-level counts with the job.
    assert len(store.list(ingest_documents("j"))) == len(plan.z_ranges)
    outputs = handlers.run_finalize(lease_for(tmp_path / "f", store_url, "finalize"))
    assert outputs == {"volume": store.key_url("volumes/t.zarr")}
    data = open_source(str(tmp_path / "f")).read(0, 5)
    np.testing.assert_array_equal(store.open_volume("volumes/t.zarr")[:], data)
    # Finalize added them up into the volume's attributes (no second read) and removed them.
    info = store.volume_info("volumes/t.zarr")
    assert recorded_levels(info.attributes) == GreyLevels.of(data)
    assert store.list(ingest_documents("j")) == []


def test_task_handlers_refuse_bad_params_and_specs(tmp_path: Path) -> None:
    png_folder(tmp_path / "f", z=4)
    store_url = f"file://{tmp_path / 'store'}"
    handlers = IngestTaskHandlers(make_settings(store_url))
    from deep3m.core.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError) as err:
        handlers.run_ingest_range(
            lease_for(tmp_path / "f", store_url, "ingest", z_start="zero", z_stop="2")
        )
    assert err.value.field == "task.params.z_start"
    lease = lease_for(tmp_path / "f", store_url, "ingest", z_start="0", z_stop="2")
    lease.spec.predict.model = "m"  # the oneof now holds a predict spec
    with pytest.raises(InvalidArgumentError) as err:
        handlers.run_ingest_range(lease)
    assert err.value.field == "spec"
    outside = lease_for(
        tmp_path / "f", f"file://{tmp_path / 'other'}", "ingest", z_start="0", z_stop="2"
    )
    with pytest.raises(InvalidArgumentError) as err:
        handlers.run_ingest_range(outside)
    assert "other" in err.value.message


# -- `deep3m serve tiling` as a real process ---------------------------------------------------
def test_serve_tiling_answers_health_and_reflection_and_stops_on_sigterm(tmp_path: Path) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEP3M_")}
    env.update(
        {
            "DEEP3M_GRPC_PORT": str(grpc_port),
            "DEEP3M_METRICS_PORT": str(metrics_port),
            "DEEP3M_WORKER_ENABLED": "false",
            "DEEP3M_HOST": "127.0.0.1",
            "DEEP3M_STORE_URL": f"file://{tmp_path / 'store'}",
        }
    )
    exe = Path(sys.executable).with_name("deep3m")
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(exe), "serve", "tiling"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        try:
            grpc.channel_ready_future(channel).result(timeout=60)
        except grpc.FutureTimeoutError:
            pytest.fail(f"server did not come up: {(tmp_path / 'serve.log').read_text()}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            status = health.Check(
                health_pb2.HealthCheckRequest(service="deep3m.v1.Tiling"),
                timeout=5,
                wait_for_ready=True,
            ).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert "deep3m.v1.Tiling" in names and "grpc.health.v1.Health" in names
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            assert b"deep3m_ingest_bytes_total" in resp.read()
        channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


# -- an ingest job end to end: real scheduler, tiling role with its worker ------------------
def test_ingest_job_runs_on_the_tiling_worker(tmp_path: Path) -> None:
    from deep3m.client.client import Deep3mClient
    from deep3m.scheduler.app import SchedulerApp
    from deep3m.scheduler.core import Scheduler

    paths = png_folder(tmp_path / "pages", z=7)
    settings = make_settings(
        f"file://{tmp_path / 'store'}",
        lease_seconds=5.0,
        poll_interval_seconds=0.05,
        retry_backoff_seconds=0.05,
        rpc_timeout_seconds=10.0,
    )
    scheduler = Scheduler(settings)
    scheduler.recover()
    sched = create_server(
        "scheduler", settings, app=SchedulerApp(settings, scheduler), port=0, host="127.0.0.1"
    )
    worker_settings = settings.model_copy(
        update={"scheduler_address": sched.address, "worker_enabled": True}
    )
    tiling = create_server("tiling", worker_settings, port=0, host="127.0.0.1")
    client = Deep3mClient(sched.address, timeout_s=10.0)
    try:
        job = client.ingest(
            str(tmp_path / "pages"),
            "volumes/job.zarr",
            voxel_size_nm=[40, 6, 6],
            chunk_shape=[2, 16, 16],
        )
        events = list(client.watch(job.id, timeout_s=60))
        assert events[-1].state == "SUCCEEDED", events[-1]
        done = client.get(job.id)
        assert [(s.name, s.tasks_done, s.tasks_total) for s in done.stages] == [
            ("ingest", 4, 4),
            ("finalize", 1, 1),
        ]
        assert done.metrics["voxels"] == 7 * 24 * 32
        store = Store(settings.store_url)
        assert done.outputs["volume"] == store.key_url("volumes/job.zarr")
        reference = np.stack([np.asarray(Image.open(p)) for p in paths])
        np.testing.assert_array_equal(store.open_volume("volumes/job.zarr")[:], reference)
        # The ranges' counts, added up at finalize, describe the whole volume.
        info = store.volume_info("volumes/job.zarr")
        assert recorded_levels(info.attributes) == GreyLevels.of(reference)
        assert store.list(ingest_documents(job.id)) == []
    finally:
        client.close()
        tiling.stop(2.0)
        sched.stop(1.0)


@pytest.mark.data
def test_a_caller_that_gives_up_leaves_no_partial_volume(
    data_dir: Path, tmp_path: Path, serve
) -> None:
    t = serve(make_settings(f"file://{tmp_path / 'store'}"))
    folder = data_dir / "cdeep3m-mito" / "training" / "images"
    request = ingest_request(folder, "volumes/gone.zarr", chunk_shape=[1, 256, 256])
    with pytest.raises(grpc.RpcError) as err:
        t.stub.Ingest(request, timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The handler runs on after the call ended; wait until it has finished one way.
    store = t.store

    def state() -> str:
        if not list(store.walk_files("volumes/gone.zarr")):
            return "gone"
        try:
            return "complete" if store.volume_info("volumes/gone.zarr").complete else "partial"
        except NotFoundError:  # being deleted right now
            return "partial"

    deadline = time.monotonic() + 30
    while state() == "partial" and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the store, bounded by the deadline above
    final = state()
    # Gone, or (had it finished just as the caller left) whole; never half-written.
    assert final in ("gone", "complete")
    if final == "gone":
        assert stored_files(store) == []
