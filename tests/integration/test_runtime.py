"""The runtime on a real gRPC server (loopback, port 0): health, reflection,
error mapping, graceful stop, deadlines.

The role here is a probe: real servicers of deep3m.v1.Postprocess (unary) and
deep3m.v1.Scheduler.WatchJob (server streaming) whose behaviour is chosen by the
request, so every path through the interceptor can be driven from a client.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from deep3m.core import errors
from deep3m.runtime.channel import call_options, connect
from deep3m.runtime.interceptor import INTERNAL_MESSAGE, error_detail
from deep3m.runtime.server import RunningServer, create_server
from deep3m.runtime.settings import Settings
from deep3m.testing.seaweed import free_port
from deep3m.v1 import (
    common_pb2,
    postprocess_pb2,
    postprocess_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

WAIT_S = 10.0
POSTPROCESS = postprocess_pb2.DESCRIPTOR.services_by_name["Postprocess"].full_name
SCHEDULER = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name

DOMAIN_ERRORS = sorted(
    (
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.Deep3mError) and cls is not errors.Deep3mError
    ),
    key=lambda c: c.__name__,
)


def _raise_named(name: str, field: str) -> None:
    cls = getattr(errors, name)
    raise cls(f"{name} raised on purpose", field=field)


class ProbePostprocess(postprocess_pb2_grpc.PostprocessServicer):
    """Label's behaviour is chosen by ``probabilities.path``."""

    def __init__(self) -> None:
        self.slow_entered = threading.Event()
        self.slow_release = threading.Event()

    def Label(self, request: Any, context: grpc.ServicerContext) -> Any:
        action, _, arg = request.probabilities.path.partition(":")
        if action == "raise":
            _raise_named(arg, "probabilities.path")
        if action == "crash":
            raise RuntimeError("secret-detail-42 must stay in the log")
        if action == "abort":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "servicer chose this status")
        if action == "downstream":
            # A call to a service that is not there, as a role calling another would.
            with grpc.insecure_channel(arg) as channel:
                postprocess_pb2_grpc.PostprocessStub(channel).Label(
                    postprocess_pb2.LabelRequest(), timeout=WAIT_S
                )
        if action == "slow":
            self.slow_entered.set()
            if not self.slow_release.wait(WAIT_S):
                raise TimeoutError("slow call was never released")
        return postprocess_pb2.LabelResponse(object_count=7)


class ProbeScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """WatchJob streams two events, then fails as ``job_id`` says."""

    def WatchJob(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        for n in range(2):
            yield common_pb2.ProgressEvent(job_id=request.job_id, tasks_done=n)
        action, _, arg = request.job_id.partition(":")
        if action == "raise":
            _raise_named(arg, "job_id")
        if action == "crash":
            raise RuntimeError("stream-secret")


class ProbeApp:
    """A RoleApp whose start() can be held until the test releases it."""

    service_names = (POSTPROCESS, SCHEDULER)

    def __init__(self, *, hold_start: bool = False) -> None:
        self.postprocess = ProbePostprocess()
        self.hold_start = hold_start
        self.start_entered = threading.Event()
        self.start_release = threading.Event()
        self.stopped_grace: float | None = None
        self.side_port = 0

    def register(self, server: grpc.Server) -> None:
        postprocess_pb2_grpc.add_PostprocessServicer_to_server(self.postprocess, server)
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(ProbeScheduler(), server)
        if self.hold_start:
            # create_server only returns its port after start(); a second loopback
            # port lets the test reach the server while start() is still running.
            self.side_port = server.add_insecure_port("127.0.0.1:0")

    def start(self) -> None:
        self.start_entered.set()
        if self.hold_start and not self.start_release.wait(WAIT_S):
            raise TimeoutError("start() was never released")

    def stop(self, grace: float) -> None:
        self.stopped_grace = grace


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(
        store_url=f"file://{tmp_path}/store",
        metrics_port=0,
        worker_enabled=False,
        **overrides,
    )


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[RunningServer, ProbeApp]]:
    app = ProbeApp()
    server = create_server("postprocess", _settings(tmp_path), app=app, port=0, host="127.0.0.1")
    try:
        yield server, app
    finally:
        app.postprocess.slow_release.set()
        server.stop(0)


@pytest.fixture
def channel(running: tuple[RunningServer, ProbeApp]) -> Iterator[grpc.Channel]:
    with connect(running[0].address, timeout_s=WAIT_S) as ch:
        yield ch


def _label(channel: grpc.Channel, path: str, timeout: float = WAIT_S) -> Any:
    stub = postprocess_pb2_grpc.PostprocessStub(channel)
    request = postprocess_pb2.LabelRequest(probabilities=common_pb2.VolumeRef(path=path))
    return stub.Label(request, timeout=timeout)


def _health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT_S)
    return int(reply.status)


def test_health_is_not_serving_until_start_returns(tmp_path: Path) -> None:
    app = ProbeApp(hold_start=True)
    result: dict[str, RunningServer] = {}

    def build() -> None:
        result["server"] = create_server(
            "postprocess", _settings(tmp_path), app=app, port=0, host="127.0.0.1"
        )

    builder = threading.Thread(target=build)
    builder.start()
    try:
        assert app.start_entered.wait(WAIT_S)
        with connect(f"127.0.0.1:{app.side_port}", timeout_s=WAIT_S) as ch:
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            assert _health(ch) == not_serving
            assert _health(ch, POSTPROCESS) == not_serving
            assert _health(ch, SCHEDULER) == not_serving
            app.start_release.set()
            builder.join(WAIT_S)
            assert not builder.is_alive()
            serving = health_pb2.HealthCheckResponse.SERVING
            assert _health(ch) == serving
            assert _health(ch, POSTPROCESS) == serving
    finally:
        app.start_release.set()
        builder.join(WAIT_S)
        if "server" in result:
            result["server"].stop(0)


def test_failed_start_leaves_no_server_listening(tmp_path: Path) -> None:
    class BrokenApp(ProbeApp):
        def start(self) -> None:
            raise errors.UnavailableError("store unreachable", field="store_url")

    app = BrokenApp(hold_start=True)
    with pytest.raises(errors.UnavailableError):
        create_server("postprocess", _settings(tmp_path), app=app, port=0, host="127.0.0.1")
    with pytest.raises(errors.UnavailableError, match=f"127.0.0.1:{app.side_port}"):
        connect(f"127.0.0.1:{app.side_port}", timeout_s=0.5)


def test_reflection_lists_the_role_services(
    running: tuple[RunningServer, ProbeApp], channel: grpc.Channel
) -> None:
    names = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {POSTPROCESS, SCHEDULER, "grpc.health.v1.Health"} <= names
    assert "deep3m.v1.Tiling" not in names


def test_a_plain_call_succeeds(channel: grpc.Channel) -> None:
    assert _label(channel, "ok").object_count == 7


@pytest.mark.parametrize("cls", DOMAIN_ERRORS, ids=lambda c: c.__name__)
def test_every_domain_error_maps_to_its_status(
    channel: grpc.Channel, cls: type[errors.Deep3mError]
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _label(channel, f"raise:{cls.__name__}")
    err = caught.value
    assert err.code() == getattr(grpc.StatusCode, cls.grpc_code_name)
    assert err.details() == f"{cls.__name__} raised on purpose"
    detail = error_detail(err)
    assert detail is not None
    assert detail.field == "probabilities.path"
    assert detail.code == cls.grpc_code_name
    assert detail.message == err.details()


def test_domain_errors_cover_the_documented_codes() -> None:
    codes = {cls.grpc_code_name for cls in DOMAIN_ERRORS}
    assert {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
    } <= codes


def test_unexpected_exception_is_internal_with_traceback_in_log(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="deep3m.rpc"), pytest.raises(grpc.RpcError) as c:
        _label(channel, "crash")
    assert c.value.code() == grpc.StatusCode.INTERNAL
    assert c.value.details() == INTERNAL_MESSAGE
    assert "secret-detail-42" not in (c.value.details() or "")
    assert error_detail(c.value) is None
    logged = [r for r in caplog.records if r.name == "deep3m.rpc" and r.exc_info]
    assert logged, "the traceback was not logged"
    exc_type, exc, _ = logged[0].exc_info  # type: ignore[misc]
    assert exc_type is RuntimeError
    assert "secret-detail-42" in str(exc)
    assert "/deep3m.v1.Postprocess/Label" in logged[0].getMessage()


def test_a_servicer_abort_keeps_its_status(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _label(channel, "abort")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "servicer chose this status"


def test_an_unreachable_dependency_maps_to_unavailable(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _label(channel, f"downstream:127.0.0.1:{free_port()}")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "depends on failed" in (caught.value.details() or "")


@pytest.mark.parametrize(
    ("job_id", "code", "field"),
    [
        ("raise:NotFoundError", grpc.StatusCode.NOT_FOUND, "job_id"),
        ("raise:CancelledError", grpc.StatusCode.CANCELLED, "job_id"),
        ("crash", grpc.StatusCode.INTERNAL, None),
    ],
)
def test_streaming_errors_map_after_partial_output(
    channel: grpc.Channel, job_id: str, code: grpc.StatusCode, field: str | None
) -> None:
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    stream = stub.WatchJob(scheduler_pb2.WatchJobRequest(job_id=job_id), timeout=WAIT_S)
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for event in stream:
            received.append(event.tasks_done)
    assert received == [0, 1]
    assert caught.value.code() == code
    detail = error_detail(caught.value)
    if field is None:
        assert detail is None
        assert caught.value.details() == INTERNAL_MESSAGE
    else:
        assert detail is not None and detail.field == field


def test_graceful_stop_finishes_in_flight_and_refuses_new(tmp_path: Path) -> None:
    app = ProbeApp()
    server = create_server("postprocess", _settings(tmp_path), app=app, port=0, host="127.0.0.1")
    stopper = threading.Thread(target=server.stop, args=(WAIT_S,))
    try:
        with connect(server.address, timeout_s=WAIT_S) as ch:
            stub = postprocess_pb2_grpc.PostprocessStub(ch)
            in_flight = stub.Label.future(
                postprocess_pb2.LabelRequest(probabilities=common_pb2.VolumeRef(path="slow")),
                timeout=WAIT_S,
            )
            assert app.postprocess.slow_entered.wait(WAIT_S)
            stopper.start()
            # Health turns NOT_SERVING first, then the server refuses new calls;
            # poll for the refusal with a deadline (each probe is a real RPC).
            refused = threading.Event()
            for _ in range(500):
                try:
                    _label(ch, "ok", timeout=2.0)
                except grpc.RpcError as err:
                    # grpc refuses calls on a draining server as CANCELLED (open
                    # connection) or UNAVAILABLE (new connection).
                    assert err.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
                    refused.set()
                    break
                threading.Event().wait(0.01)
            assert refused.is_set(), "new RPCs were still accepted after stop()"
            assert not in_flight.done()
            app.postprocess.slow_release.set()
            assert in_flight.result(timeout=WAIT_S).object_count == 7
            stopper.join(WAIT_S)
            assert not stopper.is_alive()
            assert app.stopped_grace == WAIT_S
    finally:
        app.postprocess.slow_release.set()
        server.stop(0)
        if stopper.is_alive():
            stopper.join(WAIT_S)


def test_call_options_set_the_default_deadline(
    tmp_path: Path, running: tuple[RunningServer, ProbeApp], channel: grpc.Channel
) -> None:
    settings = _settings(tmp_path, rpc_timeout_seconds=0.3)
    assert call_options(settings) == {"timeout": 0.3}
    assert call_options(settings, timeout_s=5) == {"timeout": 5.0}
    stub = postprocess_pb2_grpc.PostprocessStub(channel)
    request = postprocess_pb2.LabelRequest(probabilities=common_pb2.VolumeRef(path="slow"))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Label(request, **call_options(settings))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert running[1].postprocess.slow_entered.is_set()


def test_call_options_reject_a_nonpositive_timeout(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="timeout"):
        call_options(_settings(tmp_path), timeout_s=0)


def test_connect_names_an_unreachable_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(errors.UnavailableError) as caught:
        connect(address, timeout_s=0.3)
    assert address in caught.value.message
    assert caught.value.field == "address"


@pytest.mark.parametrize("address", ["", "localhost"])
def test_connect_rejects_a_malformed_address(address: str) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="host:port"):
        connect(address, timeout_s=1)


def test_the_server_runs_the_worker_a_role_declares(tmp_path: Path) -> None:
    from deep3m.launcher.local import free_port

    # A scheduler address nobody listens on: the worker keeps trying, and stop still returns.
    settings = _settings(
        tmp_path, scheduler_address=f"127.0.0.1:{free_port()}", poll_interval_seconds=0.05
    ).model_copy(update={"worker_enabled": True})
    server = create_server("tiling", settings, port=0, host="127.0.0.1")
    try:
        assert server.worker is not None
        assert (server.worker.role, sorted(server.worker.handlers)) == (
            "tiling",
            ["finalize", "ingest"],
        )
    finally:
        server.stop(grace=1.0)
    assert server.worker is None
    quiet = create_server("tiling", _settings(tmp_path), port=0, host="127.0.0.1")
    try:
        assert quiet.worker is None  # DEEP3M_WORKER_ENABLED=false: servicers only
    finally:
        quiet.stop(grace=1.0)
    probe = create_server("postprocess", settings, app=ProbeApp(), port=0, host="127.0.0.1")
    try:
        assert probe.worker is None  # an app that declares no handlers runs no worker
    finally:
        probe.stop(grace=1.0)
