"""The shared bounded map and backoff policy."""

from __future__ import annotations

import threading

import pytest
from deep3m.core.errors import store_unreachable
from deep3m.core.executor import bounded_map
from deep3m.core.retry import Backoff, retry_while


@pytest.mark.parametrize("workers", [1, 3])
def test_bounded_map_returns_every_result_once(workers: int) -> None:
    got = dict(bounded_map(lambda x: x * x, range(50), workers))
    assert got == {i: i * i for i in range(50)}


def test_bounded_map_keeps_at_most_in_flight_alive() -> None:
    alive = 0
    peak = 0
    lock = threading.Lock()
    gate = threading.Semaphore(0)

    def work(x: int) -> int:
        nonlocal alive, peak
        with lock:
            alive += 1
            peak = max(peak, alive)
        gate.acquire(timeout=5)
        with lock:
            alive -= 1
        return x

    def feeder():  # release one item each time the consumer asks for more
        for i in range(20):
            gate.release()
            yield i

    results = list(bounded_map(work, feeder(), 4, in_flight=4))
    assert sorted(i for i, _ in results) == list(range(20))
    assert peak <= 4


def test_bounded_map_propagates_the_first_error_and_stops_submitting() -> None:
    started: list[int] = []

    def work(x: int) -> int:
        started.append(x)
        if x == 3:
            raise ValueError("block 3 is bad")
        return x

    with pytest.raises(ValueError, match="block 3"):
        list(bounded_map(work, range(1000), 2, in_flight=4))
    assert len(started) < 1000


def test_bounded_map_stop_ends_early_without_error() -> None:
    stop = threading.Event()

    def work(x: int) -> int:
        if x == 5:
            stop.set()
        return x

    got = list(bounded_map(work, range(1000), 1, stop=stop))
    assert len(got) == 6


def test_backoff_grows_to_its_cap_and_resets() -> None:
    b = Backoff(initial_s=0.1, max_s=0.5, factor=2.0)
    assert [round(b.next_delay(), 3) for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    b.reset()
    assert b.next_delay() == pytest.approx(0.1)


def test_backoff_jitter_stays_within_its_band() -> None:
    b = Backoff(initial_s=1.0, max_s=1.0, jitter=0.25)
    delays = [b.next_delay() for _ in range(200)]
    assert all(0.75 <= d <= 1.25 for d in delays)
    assert max(delays) - min(delays) > 0.1


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(initial_s=0.0)


def test_missing_store_credentials_are_named_not_internal() -> None:
    from botocore.exceptions import NoCredentialsError
    from deep3m.core.errors import FailedPreconditionError, storage_access_error

    try:
        try:
            raise NoCredentialsError()
        except NoCredentialsError as inner:
            raise OSError("s3fs gave up") from inner
    except OSError as exc:
        err = storage_access_error(exc)
    assert isinstance(err, FailedPreconditionError)
    assert "DEEP3M_S3_ACCESS_KEY_ID" in err.message and err.field == "store_url"
    denied = storage_access_error(PermissionError("AccessDenied: bucket x"))
    assert denied is not None and "AccessDenied" in denied.message
    assert storage_access_error(ValueError("unrelated")) is None


def test_an_unreachable_store_is_unavailable_not_internal() -> None:
    from botocore.exceptions import EndpointConnectionError as BotoEndpointError
    from deep3m.core.errors import UnavailableError, storage_access_error

    err = storage_access_error(BotoEndpointError(endpoint_url="http://127.0.0.1:1/b/k"))
    assert isinstance(err, UnavailableError) and err.retryable
    assert "could not be reached" in err.message and err.field == "store_url"


class EndpointConnectionError(Exception):
    """Named like botocore's (core matches by class name, importing no botocore)."""


class ClientError(Exception):
    def __init__(self, status: int, code: str) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


def _caused(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "refused"),
        TimeoutError("read timed out"),
        EndpointConnectionError("could not connect"),
        # s3fs turns a 503 into an OSError caused by the ClientError
        _caused(OSError(16, "busy"), ClientError(503, "SlowDown")),
        _caused(ValueError("wrapped"), _caused(RuntimeError("x"), ConnectionResetError())),
    ],
)
def test_an_unreachable_or_busy_store_is_recognised(exc: BaseException) -> None:
    assert store_unreachable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError("no such key"),
        PermissionError("AccessDenied"),
        OSError("the store refused the write"),
        _caused(OSError(5, "bad"), ClientError(400, "InvalidArgument")),
        ValueError("bad input"),
    ],
)
def test_other_store_errors_are_not_waited_out(exc: BaseException) -> None:
    assert not store_unreachable(exc)


def test_retry_while_retries_transient_errors_then_returns() -> None:
    calls: list[int] = []
    heard: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("down")
        return "ok"

    got = retry_while(
        flaky,
        store_unreachable,
        budget_s=60,
        backoff=Backoff(0.001, 0.002),
        on_retry=lambda exc, delay: heard.append(delay),
    )
    assert got == "ok" and len(calls) == 3 and len(heard) == 2


def test_retry_while_gives_up_on_other_errors_the_budget_or_a_stop() -> None:
    def fails(exc: Exception) -> None:
        raise exc

    with pytest.raises(ValueError):
        retry_while(lambda: fails(ValueError("bad")), store_unreachable, budget_s=60)
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        raise ConnectionRefusedError("down")

    with pytest.raises(ConnectionRefusedError):
        retry_while(down, store_unreachable, budget_s=0.05, backoff=Backoff(0.01, 0.01))
    assert 1 < len(calls) < 10
    stop = threading.Event()
    stop.set()
    calls.clear()
    with pytest.raises(ConnectionRefusedError):
        retry_while(down, store_unreachable, budget_s=60, wait=stop.wait)
    assert len(calls) == 1
