"""Authentication and TLS on a real scheduler server: who may call what.

Certificates and tokens are generated for each test (``generate_credentials``,
built on ``cryptography``); the server runs with mutual TLS and bearer tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from deep3m.client.client import Deep3mClient
from deep3m.core.errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from deep3m.core.store import Store
from deep3m.runtime.auth import TokenTable, read_token_dir
from deep3m.runtime.channel import ChannelSecurity
from deep3m.runtime.credentials import Credentials, generate_credentials
from deep3m.runtime.healthcheck import check_health
from deep3m.runtime.scheduler_client import GrpcSchedulerClient
from deep3m.runtime.server import RunningServer, create_server
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import TaskContext, TaskResult
from deep3m.runtime.worker import Worker
from deep3m.testing.scheduler import double_block_metrics, lease_cells, serve_scheduler
from deep3m.v1 import common_pb2

TIMEOUT = 10.0


@dataclass
class Secured:
    creds: Credentials
    server: RunningServer
    settings: Settings

    def security(self, token: str = "", **changes: object) -> ChannelSecurity:
        values: dict[str, object] = dict(
            token=token,
            tls=True,
            ca_file=str(self.creds.ca_file),
            cert_file=str(self.creds.cert_file),
            key_file=str(self.creds.key_file),
        )
        values.update(changes)
        return ChannelSecurity(**values)  # type: ignore[arg-type]

    def client(self, token: str, **changes: object) -> Deep3mClient:
        return Deep3mClient(
            self.server.address, timeout_s=TIMEOUT, security=self.security(token, **changes)
        )

    def worker(self, role: str) -> GrpcSchedulerClient:
        token = self.creds.worker_tokens[role]
        return GrpcSchedulerClient(self.server.address, security=self.security(token))


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    creds = generate_credentials(tmp_path / "credentials")
    values = {k.removeprefix("DEEP3M_").lower(): v for k, v in creds.server_env().items()}
    settings = Settings(
        store_url=f"file://{tmp_path}/store",
        host="127.0.0.1",
        metrics_port=0,
        rpc_timeout_seconds=TIMEOUT,
        **values,  # type: ignore[arg-type]
    )
    server = serve_scheduler(settings, np.zeros((2, 32, 32), np.uint8))
    try:
        yield Secured(creds, server, settings)
    finally:
        server.stop(grace=1.0)


def submit(client: Deep3mClient) -> common_pb2.Job:
    return client.predict("volumes/in.zarr", "m1", "volumes/out.zarr", halo=[0, 4, 4])


def test_a_client_token_over_mutual_tls_submits_and_reads(secured: Secured) -> None:
    with secured.client(secured.creds.client_token) as client:
        job = submit(client)
        assert client.get(job.id).id == job.id
        assert [j.id for j in client.jobs()] == [job.id]
        assert client.queue_stats()["inference"]["pending"] == 1


def test_a_worker_token_cannot_submit(secured: Secured) -> None:
    with secured.client(secured.creds.worker_tokens["inference"]) as worker_as_client:
        with pytest.raises(PermissionDeniedError, match="may not call SubmitJob"):
            submit(worker_as_client)
        with pytest.raises(PermissionDeniedError):
            worker_as_client.jobs()


def test_a_client_token_cannot_lease(secured: Secured) -> None:
    sneaky = GrpcSchedulerClient(
        secured.server.address, security=secured.security(secured.creds.client_token)
    )
    try:
        with pytest.raises(PermissionDeniedError, match="may not call LeaseTasks"):
            sneaky.lease("w", "inference", 1, 5.0, timeout=TIMEOUT)
    finally:
        sneaky.close()


def test_workers_lease_and_report_only_tasks_of_their_role(secured: Secured) -> None:
    with secured.client(secured.creds.client_token) as client:
        submit(client)
    inference, training = secured.worker("inference"), secured.worker("training")
    try:
        with pytest.raises(PermissionDeniedError, match=r"role 'inference'.*role 'training'"):
            inference.lease("w", "training", 1, 5.0, timeout=TIMEOUT)
        with pytest.raises(PermissionDeniedError):
            training.lease("w", "inference", 1, 5.0, timeout=TIMEOUT)
        (lease,) = inference.lease("w", "inference", 1, 5.0, timeout=TIMEOUT)
        # A training worker cannot renew, complete or fail an inference task either.
        with pytest.raises(PermissionDeniedError):
            training.renew(lease.lease_id, "w", None, timeout=TIMEOUT)
        with pytest.raises(PermissionDeniedError):
            training.complete(lease.lease_id, "w", {}, {}, timeout=TIMEOUT)
        with pytest.raises(PermissionDeniedError):
            training.fail(
                lease.lease_id, "w", common_pb2.ErrorDetail(message="x"), True, timeout=TIMEOUT
            )
        inference.complete(
            lease.lease_id, "w", {"chunks_written": lease_cells(lease)}, {}, timeout=TIMEOUT
        )
    finally:
        inference.close()
        training.close()


def test_no_token_or_a_wrong_token_is_unauthenticated(secured: Secured) -> None:
    with (
        secured.client("") as anonymous,
        pytest.raises(UnauthenticatedError, match="requires a bearer token"),
    ):
        anonymous.jobs()
    with (
        secured.client("not-a-token") as forged,
        pytest.raises(UnauthenticatedError, match="unknown token"),
    ):
        forged.jobs()


def test_health_needs_no_token_but_tls(secured: Secured) -> None:
    assert check_health(secured.server.address, security=secured.security()) == "SERVING"
    with pytest.raises(UnavailableError):
        check_health(secured.server.address, timeout_s=2.0)  # plaintext to a TLS port


def test_a_tls_client_without_the_ca_or_its_certificate_fails(secured: Secured) -> None:
    token = secured.creds.client_token
    # The system roots do not know the deployment's CA: the handshake fails.
    with secured.client(token, ca_file="") as untrusting, pytest.raises(UnavailableError):
        untrusting.jobs()
    # Mutual TLS: a client that trusts the server but shows no certificate is refused.
    with (
        secured.client(token, cert_file="", key_file="") as anonymous_tls,
        pytest.raises(UnavailableError),
    ):
        anonymous_tls.jobs()


def test_token_folders_and_settings_define_the_principals(tmp_path: Path) -> None:
    folder = tmp_path / "tokens"
    folder.mkdir()
    (folder / "client-alice").write_text("a-token\n")
    (folder / "worker-inference").write_text("w-token")
    (folder / "..data").mkdir()  # what a mounted Kubernetes Secret also holds
    table = read_token_dir(folder)
    assert {t: (p.kind, p.role) for t, p in table.items()} == {
        "a-token": ("client", ""),
        "w-token": ("worker", "inference"),
    }
    settings = Settings(
        auth_client_tokens="c1, c2", auth_worker_tokens="training=t1", auth_token_dir=str(folder)
    )
    tokens = TokenTable.from_settings(settings)
    assert len(tokens) == 5
    principal = tokens.lookup("t1")
    assert principal is not None and (principal.kind, principal.role) == ("worker", "training")
    assert tokens.lookup("nope") is None
    with pytest.raises(InvalidArgumentError, match="unknown worker role 'gpu'"):
        TokenTable.from_settings(Settings(auth_worker_tokens="gpu=t"))
    with pytest.raises(InvalidArgumentError, match="no tokens are configured"):
        create_server("scheduler", Settings(auth_enabled=True, metrics_port=0), port=0)


def test_generated_credentials_are_reused_and_private(tmp_path: Path) -> None:
    first = generate_credentials(tmp_path / "c")
    again = generate_credentials(tmp_path / "c")
    assert again.client_token == first.client_token
    assert again.worker_tokens == first.worker_tokens
    assert len(set(first.worker_tokens.values()) | {first.client_token}) == 5
    assert first.key_file.stat().st_mode & 0o077 == 0
    assert (first.token_dir / "client").stat().st_mode & 0o077 == 0
    assert first.worker_env("inference")["DEEP3M_AUTH_TOKEN_FILE"].endswith("worker-inference")


def test_real_workers_run_a_job_over_mutual_tls_with_their_tokens(secured: Secured) -> None:
    store = Store(secured.settings.store_url)

    def predict(ctx: TaskContext) -> TaskResult:
        return TaskResult(metrics=double_block_metrics(store, ctx.lease))

    def settings_of(role: str) -> Settings:
        env = secured.creds.worker_env(role)
        values = {k.removeprefix("DEEP3M_").lower(): v for k, v in env.items()}
        return secured.settings.model_copy(
            update={
                **values,
                "scheduler_address": secured.server.address,
                "poll_interval_seconds": 0.05,
            }
        )

    workers = [
        Worker(settings_of("inference"), "inference", {"predict": predict}),
        Worker(settings_of("postprocess"), "postprocess", {"finalize": lambda ctx: TaskResult()}),
    ]
    for w in workers:
        w.start()
    try:
        with secured.client(secured.creds.client_token) as client:
            job = client.wait(submit(client).id, timeout_s=60)
    finally:
        for w in workers:
            w.stop(grace=2.0)
    assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.errors
    assert store.volume_info("volumes/out.zarr").complete


def test_a_rotated_token_folder_takes_effect_without_a_restart(secured: Secured) -> None:
    folder = secured.creds.token_dir
    stamp = folder.stat().st_mtime_ns

    def changed() -> None:
        # Distinct stamps even within one timestamp tick, as a Secret's swap gives.
        nonlocal stamp
        stamp += 1_000_000_000
        os.utime(folder, ns=(stamp, stamp))

    with secured.client("bob-token") as bob:
        with pytest.raises(UnauthenticatedError):
            bob.jobs()
        (folder / "client-bob").write_text("bob-token")
        changed()
        assert bob.jobs() == []
        (folder / "client-bob").unlink()
        changed()
        with pytest.raises(UnauthenticatedError):
            bob.jobs()


def test_the_cli_reaches_a_secured_scheduler_with_its_flags(
    secured: Secured, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deep3m.client.cli import app
    from typer.testing import CliRunner

    for name in list(os.environ):
        if name.upper().startswith("DEEP3M_"):
            monkeypatch.delenv(name)
    creds = secured.creds
    tls = ["--tls", "--ca", str(creds.ca_file), "--cert", str(creds.cert_file)]
    tls += ["--key", str(creds.key_file)]
    base = ["--scheduler", secured.server.address, "--output", "json", "--timeout", "10"]
    no_token = CliRunner().invoke(app, [*base, *tls, "jobs"])
    assert no_token.exit_code != 0 and "token" in no_token.output.lower()
    token_file = tmp_path / "client-token"
    token_file.write_text(creds.client_token + "\n")
    ok = CliRunner().invoke(app, [*base, *tls, "--token-file", str(token_file), "jobs"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout) == []
    worker = CliRunner().invoke(
        app, [*base, *tls, "--token", creds.worker_tokens["tiling"], "jobs"]
    )
    assert worker.exit_code != 0  # a worker's token does not read jobs
    missing = CliRunner().invoke(app, [*base, *tls, "--token-file", str(tmp_path / "nope"), "jobs"])
    assert missing.exit_code == 2 and "--token-file" in missing.output
