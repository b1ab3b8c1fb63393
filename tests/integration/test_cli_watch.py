"""``deep3m watch`` follows a real training job: JSON lines while it runs, then the job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from deep3m.client.cli import app
from deep3m.client.client import Deep3mClient
from deep3m.core.store import Store
from deep3m.testing.scheduler import roles_in_process
from deep3m.testing.training import stage_synthetic
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_watch_prints_training_progress_as_json_lines(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path / 'store'}")
    paths = stage_synthetic(store)
    # Progress rides on lease renewals (a third of the lease): a short lease sends
    # this short training's reports often enough to see several of them.
    with roles_in_process(store.url, "training", lease_seconds=0.9) as address:
        with Deep3mClient(address) as client:
            job = client.train(
                images=paths["images"],
                labels=paths["labels"],
                model="watched",
                validation_images=paths["validation_images"],
                validation_labels=paths["validation_labels"],
                architecture="deepem3d",
                width=0.0625,
                members=["1fm"],
                iterations=24,
                batch_size=2,
                patch_shape=[32, 32],
                validate_every=6,
                snapshot_every=12,
                learning_rate=0.05,
            )
        result = CliRunner().invoke(
            app, ["--scheduler", address, "--output", "json", "watch", job.id]
        )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    *events, final = lines
    assert final["id"] == job.id and final["state"] == "JOB_STATE_SUCCEEDED"
    assert events and all(e["event"] == "progress" and e["job_id"] == job.id for e in events)
    training = [e["training"] for e in events if "training" in e]
    assert training, "training reports reached the watch stream"
    iterations = [t["iteration"] for t in training]
    assert iterations == sorted(iterations) and all(t["iterations"] == 24 for t in training)
    assert all(t["loss"] is None or t["loss"] >= 0 for t in training)
    validated = [t for t in training if "f1" in t["validation"]]
    assert validated and 0.0 <= validated[-1]["validation"]["f1"] <= 1.0
    # Each validation (every 6 of 24 iterations, seconds apart) is reported: the
    # second report at a new iteration gives a rate, and an ETA from it.
    assert len(set(iterations)) >= 2
    assert training[-1]["iterations_per_second"] > 0
    assert training[-1]["eta_seconds"] is not None
    assert events[-1]["state"] == "SUCCEEDED"


def test_train_flags_reach_the_job_and_bad_values_are_refused_at_submission(
    tmp_path: Path,
) -> None:
    store = Store(f"file://{tmp_path / 'store'}")
    paths = stage_synthetic(store)
    common = ["train", paths["images"], paths["labels"], "--no-wait"]
    with roles_in_process(store.url) as address:  # a scheduler alone: submission only
        cli = ["--scheduler", address, "--output", "json"]
        refused = CliRunner().invoke(app, [*cli, *common, "--model", "m0", "--recipe", "fastest"])
        assert refused.exit_code != 0
        assert "recipe" in refused.output and "fastest" in refused.output
        bad_fraction = CliRunner().invoke(
            app, [*cli, *common, "--model", "m0", "--foreground-fraction", "2"]
        )
        assert bad_fraction.exit_code != 0 and "foreground_fraction" in bad_fraction.output
        bad_snapshots = CliRunner().invoke(
            app, [*cli, *common, "--model", "m0", "--snapshot-every-minutes", "-1"]
        )
        assert bad_snapshots.exit_code != 0 and "snapshot_every_minutes" in bad_snapshots.output
        result = CliRunner().invoke(
            app,
            [
                *cli,
                *common,
                "--model",
                "m1",
                "--recipe",
                "cdeep3m",
                "--minutes",
                "0.5",
                "--loss",
                "ce_dice",
                "--schedule",
                "cosine",
                "--optimizer",
                "adam",
                "--input-scale",
                "2",
                "--foreground-fraction",
                "0.25",
                "--members",
                "1fm",
                "--snapshot-every-minutes",
                "2.5",
            ],
        )
        assert result.exit_code == 0, result.output
        job_id = json.loads(result.stdout)["id"]
        with Deep3mClient(address) as client:
            spec = client.get(job_id).spec.train
            client.cancel(job_id)
    assert (spec.recipe, spec.max_minutes, spec.loss, spec.schedule) == (
        "cdeep3m",
        0.5,
        "ce_dice",
        "cosine",
    )
    assert (spec.optimizer, spec.input_scale, spec.foreground_fraction) == ("adam", 2, 0.25)
    assert spec.architecture == "deepem3d" and list(spec.members) == ["1fm"]
    assert spec.snapshot_every_minutes == 2.5


def test_predict_into_a_complete_output_needs_overwrite(tmp_path: Path) -> None:
    from deep3m.runtime.settings import Settings
    from deep3m.testing.scheduler import serve_scheduler, write_volume

    settings = Settings(store_url=f"file://{tmp_path}/store", host="127.0.0.1", metrics_port=0)
    server = serve_scheduler(settings, np.zeros((2, 32, 32), np.uint8))
    try:
        write_volume(
            Store(settings.store_url), "volumes/out.zarr", np.zeros((2, 32, 32), np.float32)
        )
        cli = ["--scheduler", server.address, "--output", "json", "predict", "volumes/in.zarr"]
        cli += ["--model", "m1", "--output", "volumes/out.zarr", "--halo", "0,4,4", "--no-wait"]
        refused = CliRunner().invoke(app, cli)
        assert refused.exit_code != 0 and "overwrite" in refused.output
        accepted = CliRunner().invoke(app, [*cli, "--overwrite"])
        assert accepted.exit_code == 0, accepted.output
        assert json.loads(accepted.stdout)["spec"]["predict"]["overwrite"] is True
    finally:
        server.stop(grace=1.0)
