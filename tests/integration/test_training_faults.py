"""A training worker going away mid-member, under the real services: a gRPC scheduler
and training workers on loopback (ephemeral ports), the doomed one in its own process.

SIGTERM (scale-down, spot interruption): the worker tells the member to stop, the
member writes a snapshot, the worker gives the task back (no attempt counted) and
exits; a new worker resumes from that snapshot. SIGKILL (a node lost): nothing runs
on the way out; the task is leased again once its lease expires (counted as an
attempt) and the job still finishes with the model in place. An adaptation member
either way continues after the last candidate it had scored.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from deep3m.client.client import Deep3mClient
from deep3m.core.store import Store
from deep3m.launcher.local import free_port, wait_serving
from deep3m.models.card import load_card
from deep3m.runtime.server import RunningServer, create_server
from deep3m.runtime.settings import Settings
from deep3m.testing.training import stage_synthetic, synthetic_stack
from deep3m.training import checkpoint as ckpt
from deep3m.training.demo_data import write_volume
from deep3m.v1 import common_pb2

# The replacement worker trains in this process: tiny networks gain nothing from threads.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

LEASE_S = 1.5  # progress rides on renewals (a third of this); an expiry takes this long
ITERATIONS = 150
PROGRESS = 5  # iterations seen on the watch stream before the worker is stopped
# Candidates every 30 iterations: the first is reported long before the member ends.
ADAPT_ITERATIONS = 600


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(f"file://{tmp_path_factory.mktemp('faults')}/store")


@pytest.fixture(scope="module")
def paths(store: Store) -> dict[str, str]:
    return stage_synthetic(store)


def settings(store: Store, address: str, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "store_url": store.url,
        "device": "cpu",
        "metrics_port": 0,
        "scheduler_address": address,
        "poll_interval_seconds": 0.05,
        "lease_seconds": LEASE_S,
        "retry_backoff_seconds": 0.05,
        "torch_threads": 1,
        **extra,
    }
    return Settings(**values)


@pytest.fixture(scope="module")
def scheduler(store: Store) -> Iterator[RunningServer]:
    port = free_port()
    running = create_server(
        "scheduler", settings(store, f"127.0.0.1:{port}"), port=port, host="127.0.0.1"
    )
    yield running
    running.stop(grace=1.0)


@contextlib.contextmanager
def doomed_worker(
    store: Store, address: str, worker_id: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``deep3m serve training`` in its own process, serving once entered; killed on exit
    if the test left it running."""
    port = free_port()
    env = {
        **os.environ,
        "DEEP3M_STORE_URL": store.url, "DEEP3M_GRPC_PORT": str(port), "DEEP3M_HOST": "127.0.0.1",
        "DEEP3M_METRICS_PORT": "0", "DEEP3M_SCHEDULER_ADDRESS": address, "DEEP3M_DEVICE": "cpu",
        "DEEP3M_WORKER_ID": worker_id, "DEEP3M_LEASE_SECONDS": str(LEASE_S),
        "DEEP3M_POLL_INTERVAL_SECONDS": "0.05", "DEEP3M_TORCH_THREADS": "1",
        # Far longer than a snapshot takes: a prompt exit shows the member did not run on.
        "DEEP3M_SHUTDOWN_GRACE_SECONDS": "120",
    }  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deep3m.client.cli", "serve", "training"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_serving(f"127.0.0.1:{port}", proc, 120, "training")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def submit_and_wait_for_progress(client: Deep3mClient, paths: dict[str, str], model: str,
                                 snapshot_every: int) -> common_pb2.Job:  # fmt: skip
    job = client.train(
        images=paths["images"],
        labels=paths["labels"],
        model=model,
        recipe="cdeep3m",
        architecture="deepem3d",
        width=0.0625,
        members=["1fm"],
        iterations=ITERATIONS,
        batch_size=2,
        patch_shape=[32, 32],
        accumulate_gradients=1,
        validate_every=50,
        snapshot_every=snapshot_every,
        learning_rate=0.05,
    )
    for event in client.watch(job.id, timeout_s=300):
        if event.stage == "train" and event.metrics.get("iteration", 0) >= PROGRESS:
            return job
    raise AssertionError("no training progress reached the watch stream")


def train_record(store: Store, job_id: str) -> dict[str, Any]:
    """The completion record of the job's one train task (alone or in a batch)."""
    prefix = f"jobs/{job_id}/done/train"
    (name,) = store.list(prefix)
    doc = json.loads(store.read_bytes(f"{prefix}/{name}"))
    if "records" in doc:
        (doc,) = doc["records"].values()
    return dict(doc)


def finish_with_replacement(
    store: Store, scheduler: RunningServer, client: Deep3mClient, job: common_pb2.Job
) -> common_pb2.Job:
    # A long lease: on a slow machine a short one can expire under the replacement too,
    # which would make its record that of a second attempt (resumed from its own
    # snapshot). Only the doomed worker's lease is meant to expire.
    replacement = create_server(
        "training",
        settings(store, scheduler.address, worker_id="replacement", lease_seconds=60.0),
        port=0,
        host="127.0.0.1",
    )
    try:
        final = client.wait(job.id, 300)
    finally:
        replacement.stop(grace=5.0)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, list(final.errors)
    return final


def test_sigterm_mid_member_snapshots_gives_the_task_back_and_a_new_worker_resumes(
    store: Store, paths: dict[str, str], scheduler: RunningServer, tmp_path: Path
) -> None:
    log = tmp_path / "terminated.log"
    with (
        doomed_worker(store, scheduler.address, "terminated", log) as doomed,
        Deep3mClient(scheduler.address, timeout_s=30) as client,
    ):
        # No snapshot falls due by count or by time (5 minutes) in this run: the only
        # snapshot there can be is the one written on the way out.
        job = submit_and_wait_for_progress(client, paths, "stopped", ITERATIONS + 1)
        doomed.send_signal(signal.SIGTERM)
        assert doomed.wait(timeout=90) == 0, log.read_text()
        stopped_at = ckpt.latest_checkpoint(store, "stopped", "1fm")
        assert stopped_at is not None and PROGRESS <= stopped_at < ITERATIONS
        given_back = client.get(job.id)
        assert given_back.stages[0].tasks_done == 0
        assert given_back.stages[0].tasks_leased == 0, "the lease was given back at once"
        final = finish_with_replacement(store, scheduler, client, job)
    record = train_record(store, job.id)
    assert record["worker_id"] == "replacement"
    assert record["attempt"] == 1, "stopping a worker counted an attempt"
    assert record["metrics"]["resumed_from"] == stopped_at > 0
    assert final.stages[0].tasks_quarantined == 0
    card = load_card(store, "stopped")
    assert card.members[0].iterations == ITERATIONS and card.members[0].weights


def test_sigkill_mid_member_the_task_is_leased_again_after_expiry_and_finishes(
    store: Store, paths: dict[str, str], scheduler: RunningServer, tmp_path: Path
) -> None:
    with (
        doomed_worker(store, scheduler.address, "killed", tmp_path / "killed.log") as doomed,
        Deep3mClient(scheduler.address, timeout_s=30) as client,
    ):
        job = submit_and_wait_for_progress(client, paths, "killed", 2)
        doomed.send_signal(signal.SIGKILL)
        assert doomed.wait(timeout=30) == -signal.SIGKILL
        newest = ckpt.latest_checkpoint(store, "killed", "1fm") or 0
        final = finish_with_replacement(store, scheduler, client, job)
    record = train_record(store, job.id)
    assert record["worker_id"] == "replacement"
    # The expired lease counts as an attempt.
    assert record["attempt"] >= 2, "the expired lease counts as an attempt"
    # It resumed from the newest snapshot the killed worker had written (or a later one).
    assert record["metrics"]["resumed_from"] >= newest
    assert final.stages[0].tasks_quarantined == 0
    card = load_card(store, "killed")
    assert card.members[0].iterations == ITERATIONS and card.members[0].weights
    assert store.exists(f"models/killed/{card.members[0].weights}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_or_killed_adaptation_member_continues_after_its_last_candidate(
    sig: signal.Signals,
    store: Store,
    paths: dict[str, str],
    scheduler: RunningServer,
    tmp_path: Path,
) -> None:
    images, _ = synthetic_stack(6, 64, seed=5)
    write_volume(store, "volumes/faults-target.zarr", (255 - images // 2).astype(np.uint8))
    model = f"adapt-{sig.name.lower()}"
    folder = f"models/{model}/1fm/adaptation"
    log = tmp_path / "adapt.log"
    with (
        doomed_worker(store, scheduler.address, model, log) as doomed,
        Deep3mClient(scheduler.address, timeout_s=30) as client,
    ):
        job = client.train(
            images=paths["images"], labels=paths["labels"], model=model,
            recipe="cdeep3m", architecture="resunet2d", width=0.0625, members=["1fm"],
            iterations=ADAPT_ITERATIONS, batch_size=2, patch_shape=[32, 32], seed=1,
            learning_rate=1e-3, adapt_to="volumes/faults-target.zarr", adaptation="ssl",
            select_by="solidity", adaptation_iterations=4, adaptation_checkpoints=20,
        )  # fmt: skip
        for event in client.watch(job.id, timeout_s=300):
            # A candidate is recorded in the store before anyone hears of it.
            if event.stage == "train" and "candidate_iteration" in event.metrics:
                break
        doomed.send_signal(sig)
        assert doomed.wait(timeout=90) == (0 if sig == signal.SIGTERM else -sig), log.read_text()
        kept = [n for n in store.list(folder) if n.startswith("candidate-") and n.endswith("json")]
        assert kept, "no candidate was recorded before the worker went away"
        last = int(max(kept).removeprefix("candidate-").removesuffix(".json"))
        assert last < ADAPT_ITERATIONS, "the member ran to its end before the worker went"
        if sig == signal.SIGTERM:
            given_back = client.get(job.id)
            assert given_back.stages[0].tasks_done == given_back.stages[0].tasks_leased == 0
        finish_with_replacement(store, scheduler, client, job)
    record = train_record(store, job.id)
    assert record["worker_id"] == "replacement"
    # Stopping counts no attempt; the lease a killed worker held expires (an attempt).
    assert record["attempt"] == 1 if sig == signal.SIGTERM else record["attempt"] >= 2
    doc = store.read_json(f"models/{model}/1fm/metrics.json")
    assert doc["resumed"]["stages"] == ["ssl-pretext"]
    # Killed while writing one, a record is incomplete and the one before is the last.
    taken = int(doc["resumed"]["candidates"][-1].removeprefix("segmentation-"))
    assert taken == last if sig == signal.SIGTERM else last - 30 <= taken <= last
    assert doc["resumed_from"] == record["metrics"]["resumed_from"] == 4 + taken
    assert len(doc["adaptation_metrics"]["candidates"]) == 20
    card = load_card(store, model)
    assert card.members[0].weights and store.exists(f"models/{model}/{card.members[0].weights}")
