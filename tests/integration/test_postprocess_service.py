"""The postprocess role on a real gRPC server (loopback) over a real file store."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tifffile
from deep3m.core.metrics import confusion_counts
from deep3m.core.store import Store
from deep3m.postprocess.evaluate import EvaluateSpec, Operand, evaluate_arrays
from deep3m.runtime.channel import connect
from deep3m.runtime.interceptor import error_detail
from deep3m.runtime.server import create_server
from deep3m.runtime.settings import Settings
from deep3m.testing.volumes import smooth_field, write_volume
from deep3m.v1 import (
    common_pb2,
    postprocess_pb2,
    postprocess_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from scipy import ndimage

WAIT_S = 30.0


def ref(path: str, **kw: str) -> common_pb2.VolumeRef:
    return common_pb2.VolumeRef(path=path, **kw)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"file://{tmp_path}/store")


@pytest.fixture
def stub(store: Store) -> Iterator[postprocess_pb2_grpc.PostprocessStub]:
    settings = Settings(store_url=store.url, metrics_port=0, worker_enabled=False)
    server = create_server("postprocess", settings, port=0, host="127.0.0.1")
    try:
        with connect(server.address, timeout_s=WAIT_S) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="deep3m.v1.Postprocess"), timeout=WAIT_S
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            yield postprocess_pb2_grpc.PostprocessStub(channel)
    finally:
        server.stop(0)


def put(store: Store, path: str, data: np.ndarray, chunks: tuple[int, int, int] = (4, 16, 16),
        *, complete: bool = True, **attrs: Any) -> None:  # fmt: skip
    write_volume(
        store, path, data, chunks, voxel_size_nm=(40.0, 6.0, 6.0), complete=complete, **attrs
    )


def probabilities(shape: tuple[int, int, int] = (8, 48, 40), seed: int = 0) -> np.ndarray:
    return smooth_field(shape, seed)


def expect_error(call: Any, request: Any, code: grpc.StatusCode, field: str) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=WAIT_S)
    err = caught.value
    assert err.code() == code, err.details()
    detail = error_detail(err)
    assert detail is not None and detail.field == field, detail
    return str(err.details())


def test_label(store: Store, stub: postprocess_pb2_grpc.PostprocessStub) -> None:
    prob = probabilities()
    put(store, "volumes/p.zarr", prob, kind="probabilities")
    reply = stub.Label(
        postprocess_pb2.LabelRequest(probabilities=ref("volumes/p.zarr"), threshold=0.6),
        timeout=WAIT_S,
    )
    want, n = ndimage.label(prob >= 0.6)
    assert reply.object_count == n > 2
    assert reply.labels.path == "volumes/p.zarr/labels/segmentation"
    assert reply.labels.store_url == store.url
    assert len(reply.objects) == n
    sizes = np.bincount(want.ravel())[1:]
    assert sorted(r.volume_voxels for r in reply.objects) == sorted(sizes.tolist())
    assert all(len(r.centroid) == 3 and len(r.bbox.start) == 3 for r in reply.objects)
    assert reply.tables == [
        f"{store.url}/volumes/p.segmentation.objects.csv",
        f"{store.url}/volumes/p.segmentation.objects.json",
    ]
    got = store.open_volume(reply.labels.path)[:]
    assert ((got > 0) == (want > 0)).all() and got.max() == n


def test_label_with_watershed_and_min_size_into_an_output(
    store: Store, stub: postprocess_pb2_grpc.PostprocessStub
) -> None:
    z, y, x = np.indices((20, 24, 40))
    spheres = ((z - 10) ** 2 + (y - 12) ** 2 + (x - 12) ** 2 <= 64) | (
        (z - 10) ** 2 + (y - 12) ** 2 + (x - 26) ** 2 <= 64
    )
    mask = spheres.astype(np.float32)
    mask[0, 0, 0] = 1.0  # a speck, removed by min_size
    put(store, "volumes/s.zarr", mask, (10, 24, 20))
    reply = stub.Label(
        postprocess_pb2.LabelRequest(
            probabilities=ref("volumes/s.zarr"),
            output=ref("volumes/s-labels.zarr"),
            watershed=True,
            min_size_voxels=10,
        ),
        timeout=WAIT_S,
    )
    assert reply.object_count == 2
    assert reply.labels.path == "volumes/s-labels.zarr"
    assert store.open_volume("volumes/s-labels.zarr")[0, 0, 0] == 0


def test_label_errors_name_the_field_and_write_nothing(
    store: Store, stub: postprocess_pb2_grpc.PostprocessStub
) -> None:
    put(store, "volumes/p.zarr", probabilities())
    request = postprocess_pb2.LabelRequest
    message = expect_error(
        stub.Label,
        request(probabilities=ref("volumes/p.zarr"), threshold=1.5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "threshold",
    )
    assert "1.5" in message
    assert not store.exists("volumes/p.zarr/labels")
    message = expect_error(
        stub.Label,
        request(probabilities=ref("volumes/none.zarr")),
        grpc.StatusCode.NOT_FOUND,
        "probabilities.path",
    )
    assert "volumes/none.zarr" in message
    expect_error(
        stub.Label,
        request(probabilities=ref("")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "probabilities.path",
    )
    expect_error(
        stub.Label,
        request(probabilities=ref("volumes/p.zarr", store_url="s3://someone-else/x")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "probabilities.store_url",
    )
    expect_error(
        stub.Label,
        request(probabilities=ref("volumes/p.zarr"), min_size_voxels=-3),
        grpc.StatusCode.INVALID_ARGUMENT,
        "min_size_voxels",
    )
    put(store, "volumes/half.zarr", probabilities(), complete=False)
    expect_error(
        stub.Label,
        request(probabilities=ref("volumes/half.zarr")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "probabilities.path",
    )
    assert not store.exists("volumes/half.zarr/labels/segmentation")


def test_evaluate(store: Store, stub: postprocess_pb2_grpc.PostprocessStub) -> None:
    prob = probabilities(seed=1)
    truth = (np.roll(prob, 3, axis=2) >= 0.55).astype(np.uint8)
    put(store, "volumes/p.zarr", prob, kind="probabilities")
    put(store, "volumes/gt.zarr", truth, (2, 16, 16))
    reply = stub.Evaluate(
        postprocess_pb2.EvaluateRequest(
            prediction=ref("volumes/p.zarr"),
            ground_truth=ref("volumes/gt.zarr"),
            threshold=0.55,
            exclusion_zone_voxels=1,
        ),
        timeout=WAIT_S,
    )
    want = confusion_counts(prob >= 0.55, truth, exclusion_zone=1)
    assert (
        reply.true_positives,
        reply.false_positives,
        reply.false_negatives,
        reply.true_negatives,
    ) == (want.true_positives, want.false_positives, want.false_negatives, want.true_negatives)
    assert reply.f1 == pytest.approx(want.f1) and reply.jaccard == pytest.approx(want.jaccard)
    n_truth = ndimage.label(truth)[1]
    assert reply.object_true_positives + reply.object_false_negatives == n_truth
    assert 0 < reply.object_f1 <= 1


def test_evaluate_with_min_size_and_overlays(
    store: Store, stub: postprocess_pb2_grpc.PostprocessStub, tmp_path: Path
) -> None:
    prob = probabilities(seed=2)
    truth = (np.roll(prob, 2, axis=1) >= 0.6).astype(np.uint8)
    put(store, "volumes/p.zarr", prob, kind="probabilities")
    put(store, "volumes/gt.zarr", truth)
    put(store, "volumes/img.zarr", (prob * 255).astype(np.uint8), kind="image")
    request = postprocess_pb2.EvaluateRequest(
        prediction=ref("volumes/p.zarr"), ground_truth=ref("volumes/gt.zarr"), threshold=0.6,
        min_size_voxels=40, overlays="exports/errors", image=ref("volumes/img.zarr"),
        overlay_slices=[1, 5],
    )  # fmt: skip
    reply = stub.Evaluate(request, timeout=WAIT_S)
    want = evaluate_arrays(
        Operand(prob, "probability"), Operand(truth, "labels"),
        EvaluateSpec(threshold=0.6, min_size_voxels=40),
    ).objects  # fmt: skip
    unfiltered = evaluate_arrays(
        Operand(prob, "probability"), Operand(truth, "labels"), EvaluateSpec(threshold=0.6)
    ).objects
    assert want is not None and unfiltered is not None
    assert want.false_positives < unfiltered.false_positives  # the filter matters here
    assert (reply.object_true_positives, reply.object_false_positives) == (
        want.true_positives, want.false_positives,
    )  # fmt: skip
    assert [Path(f).name for f in reply.overlays] == ["errors_0001.png", "errors_0005.png"]
    # A relative destination is a place in the store, never the server's working folder.
    inside = Path(store.url.removeprefix("file://")) / "exports" / "errors"
    assert all(Path(f).is_file() and Path(f).parent == inside for f in reply.overlays)
    expect_error(
        stub.Evaluate,
        postprocess_pb2.EvaluateRequest(
            prediction=ref("volumes/p.zarr"),
            ground_truth=ref("volumes/gt.zarr"),
            overlays="s3://elsewhere/errors",
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "overlays",
    )


def test_evaluate_errors(store: Store, stub: postprocess_pb2_grpc.PostprocessStub) -> None:
    put(store, "volumes/p.zarr", probabilities())
    put(store, "volumes/small.zarr", np.zeros((8, 48, 32), np.uint8))
    request = postprocess_pb2.EvaluateRequest
    message = expect_error(
        stub.Evaluate,
        request(prediction=ref("volumes/p.zarr"), ground_truth=ref("volumes/small.zarr")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ground_truth",
    )
    assert "(8, 48, 40)" in message and "(8, 48, 32)" in message
    expect_error(
        stub.Evaluate,
        request(prediction=ref("volumes/p.zarr"), ground_truth=ref("volumes/gone.zarr")),
        grpc.StatusCode.NOT_FOUND,
        "ground_truth.path",
    )
    expect_error(
        stub.Evaluate,
        request(
            prediction=ref("volumes/p.zarr"), ground_truth=ref("volumes/small.zarr"), threshold=-0.5
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "threshold",
    )
    expect_error(
        stub.Evaluate,
        request(
            prediction=ref("volumes/p.zarr", array="7"), ground_truth=ref("volumes/small.zarr")
        ),
        grpc.StatusCode.NOT_FOUND,
        "prediction.array",
    )


def test_build_pyramid(store: Store, stub: postprocess_pb2_grpc.PostprocessStub) -> None:
    put(store, "volumes/p.zarr", probabilities((4, 64, 64)))
    reply = stub.BuildPyramid(
        postprocess_pb2.BuildPyramidRequest(volume=ref("volumes/p.zarr"), levels=2), timeout=WAIT_S
    )
    assert list(reply.arrays) == ["0", "1", "2"]
    assert store.volume_info("volumes/p.zarr", "2").shape == (4, 16, 16)
    expect_error(
        stub.BuildPyramid,
        postprocess_pb2.BuildPyramidRequest(volume=ref("volumes/p.zarr"), levels=40),
        grpc.StatusCode.INVALID_ARGUMENT,
        "levels",
    )
    expect_error(
        stub.BuildPyramid,
        postprocess_pb2.BuildPyramidRequest(volume=ref("volumes/x.zarr")),
        grpc.StatusCode.NOT_FOUND,
        "volume.path",
    )


def test_export(store: Store, stub: postprocess_pb2_grpc.PostprocessStub, tmp_path: Path) -> None:
    prob = probabilities((3, 16, 16))
    image = (prob * 200).astype(np.uint8)
    put(store, "volumes/p.zarr", prob, kind="probabilities")
    put(store, "volumes/img.zarr", image, kind="image")
    reply = stub.Export(
        postprocess_pb2.ExportRequest(
            volume=ref("volumes/p.zarr"), destination="exports/tif", format="tiff"
        ),
        timeout=WAIT_S,
    )
    (file,) = reply.files
    np.testing.assert_array_equal(tifffile.imread(file), np.rint(prob * 255).astype(np.uint8))
    reply = stub.Export(
        postprocess_pb2.ExportRequest(
            volume=ref("volumes/p.zarr"),
            image=ref("volumes/img.zarr"),
            destination="exports/overlay",
            format="overlay",
            slices=[1, 2],
        ),
        timeout=WAIT_S,
    )
    assert [Path(f).name for f in reply.files] == ["overlay_0001.png", "overlay_0002.png"]
    assert np.asarray(Image.open(reply.files[0])).shape == (16, 16, 3)
    # Into the store, through its URL.
    reply = stub.Export(
        postprocess_pb2.ExportRequest(
            volume=ref("volumes/img.zarr"), destination=f"{store.url}/exports/img", format="png"
        ),
        timeout=WAIT_S,
    )
    assert len(reply.files) == 3 and store.exists("exports/img/img_0002.png")


def test_export_errors(store: Store, stub: postprocess_pb2_grpc.PostprocessStub,
                       tmp_path: Path) -> None:  # fmt: skip
    put(store, "volumes/p.zarr", probabilities((2, 8, 8)))
    request = postprocess_pb2.ExportRequest
    expect_error(
        stub.Export,
        request(volume=ref("volumes/p.zarr"), destination=str(tmp_path), format="jpeg"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "format",
    )
    expect_error(
        stub.Export,
        request(volume=ref("volumes/p.zarr"), destination="s3://not-ours/out", format="png"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "destination",
    )
    expect_error(
        stub.Export,
        request(volume=ref("volumes/p.zarr"), destination="", format="png"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "destination",
    )
    expect_error(
        stub.Export,
        request(volume=ref("volumes/p.zarr"), destination="exports/o", format="overlay"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "image.path",
    )
    expect_error(
        stub.Export,
        request(volume=ref("volumes/q.zarr"), destination="exports/q", format="tiff"),
        grpc.StatusCode.NOT_FOUND,
        "volume.path",
    )


def test_exports_stay_inside_the_roots_and_never_overwrite(
    store: Store, stub: postprocess_pb2_grpc.PostprocessStub, tmp_path: Path
) -> None:
    put(store, "volumes/p.zarr", probabilities((2, 8, 8)))
    outside = tmp_path / "outside"
    for destination in (
        str(outside / "x"),  # absolute, outside every root
        f"file://{outside}/y",
        "../outside/z",  # relative paths are store paths: no escaping it
        f"{store.url}/../outside/w",
        "jobs/stolen",  # the scheduler's own documents
        f"{store.url}/models/m/weights",
    ):
        expect_error(
            stub.Export,
            postprocess_pb2.ExportRequest(
                volume=ref("volumes/p.zarr"), destination=destination, format="tiff"
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "destination",
        )
    assert not outside.exists() and not store.exists("jobs")
    request = postprocess_pb2.ExportRequest(
        volume=ref("volumes/p.zarr"), destination="exports/p.tif", format="tiff"
    )
    (first,) = stub.Export(request, timeout=WAIT_S).files
    before = Path(first).read_bytes()
    expect_error(stub.Export, request, grpc.StatusCode.ALREADY_EXISTS, "destination")
    assert Path(first).read_bytes() == before
    request.overwrite = True
    assert list(stub.Export(request, timeout=WAIT_S).files) == [first]


class OneFinalizeTask(scheduler_pb2_grpc.SchedulerServicer):
    """A scheduler that hands out one finalize task and records how it ended.

    The real scheduler needs a whole prediction job (model, inference) before
    it plans a finalize task; this one exercises the postprocess worker alone.
    """

    def __init__(self, lease: common_pb2.TaskLease) -> None:
        self.lease = lease
        self.given = False
        self.done = threading.Event()
        self.completed: Any = None
        self.failed: Any = None
        self._lock = threading.Lock()

    def LeaseTasks(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            if self.given or request.role != "postprocess":
                return scheduler_pb2.LeaseTasksResponse()
            self.given = True
        return scheduler_pb2.LeaseTasksResponse(leases=[self.lease])

    def RenewLease(self, request: Any, context: grpc.ServicerContext) -> Any:
        return scheduler_pb2.RenewLeaseResponse(deadline_unix_s=time.time() + 60)

    def CompleteTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.completed = request
        self.done.set()
        return scheduler_pb2.CompleteTaskResponse()

    def FailTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.failed = request
        self.done.set()
        return scheduler_pb2.FailTaskResponse()


class SchedulerDouble:
    service_names = (scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,)

    def __init__(self, servicer: OneFinalizeTask) -> None:
        self.servicer = servicer

    def register(self, server: grpc.Server) -> None:
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.servicer, server)

    def start(self) -> None:
        pass

    def stop(self, grace: float) -> None:
        pass


def test_the_worker_runs_finalize_tasks(store: Store, tmp_path: Path) -> None:
    prob = probabilities((4, 32, 32), seed=4)
    put(store, "volumes/p.zarr", prob, (4, 16, 16), complete=False, kind="probabilities")
    spec = common_pb2.JobSpec(predict=common_pb2.PredictSpec(output=ref("volumes/p.zarr")))
    lease = common_pb2.TaskLease(
        task=common_pb2.Task(id="j1/finalize/0", job_id="j1", stage="finalize", role="postprocess"),
        spec=spec,
        lease_id="lease-1",
        deadline_unix_s=time.time() + 60,
    )
    servicer = OneFinalizeTask(lease)
    base = Settings(store_url=store.url, metrics_port=0, worker_enabled=False)
    scheduler = create_server(
        "scheduler", base, app=SchedulerDouble(servicer), port=0, host="127.0.0.1"
    )
    worker_settings = base.model_copy(
        update={
            "worker_enabled": True,
            "scheduler_address": scheduler.address,
            "poll_interval_seconds": 0.05,
        }
    )
    postprocess = create_server("postprocess", worker_settings, port=0, host="127.0.0.1")
    try:
        assert servicer.done.wait(WAIT_S), "the finalize task did not finish"
    finally:
        postprocess.stop(5)
        scheduler.stop(0)
    assert servicer.failed is None, servicer.failed
    outputs = dict(servicer.completed.outputs)
    assert outputs == {"probabilities": f"{store.url}/volumes/p.zarr"}
    assert store.volume_info("volumes/p.zarr").complete
