"""What a person sees while a job runs: the progress folded from its watch stream."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator, Sequence

import pytest
from deep3m.client.progress import JobProgress, TaskProgress, follow_job
from deep3m.core.events import ProgressEvent
from deep3m.v1 import common_pb2
from rich.console import Console


class Replay:
    """A recorded watch stream, played back (the client side of ``follow_job``)."""

    def __init__(self, events: Sequence[ProgressEvent]) -> None:
        self.events = list(events)

    def watch(
        self, job_id: str, *, on_resume: Callable[[], None] | None = None
    ) -> Iterator[ProgressEvent]:
        yield from (e for e in self.events if e.job_id == job_id)

    def get(self, job_id: str) -> common_pb2.Job:
        return common_pb2.Job(id=job_id, state=common_pb2.JOB_STATE_SUCCEEDED)


def report(t: float, iteration: int, **metrics: float) -> ProgressEvent:
    return ProgressEvent(
        "j",
        "RUNNING",
        "train",
        tasks_total=2,
        task_id="train/1fm",
        metrics={"iteration": iteration, "iterations": 100, **metrics},
        time_unix_s=t,
    )


def training_stream() -> list[ProgressEvent]:
    start = ProgressEvent("j", "RUNNING", "train", tasks_total=2, time_unix_s=0.0)
    reports = [report(float(t), 10 * t, loss=1.0 / (t + 1)) for t in range(1, 10)]
    reports.insert(3, report(3.5, 35, f1=0.61, precision=0.7, recall=0.55, val_loss=0.4))
    done = ProgressEvent("j", "SUCCEEDED", "train", 2, 2, time_unix_s=10.0)
    return [start, *reports, done]


def test_rate_eta_and_validation_figures_are_derived_and_remembered() -> None:
    task = TaskProgress("t")
    assert not task.update({"iteration": 10, "iterations": 100, "loss": 0.9}, 100.0)
    assert task.iterations_per_second == 0 and task.eta_seconds is None
    task.update({"iteration": 30, "loss": 0.7}, 102.0)
    assert task.iterations_per_second == pytest.approx(10.0)
    assert task.eta_seconds == pytest.approx(7.0)
    assert task.update({"iteration": 40, "f1": 0.5, "precision": 0.6}, 103.0)
    # Smoothed: half the new rate (10 it/s) and half the old.
    assert task.iterations_per_second == pytest.approx(10.0)
    task.update({"iteration": 60, "loss": math.nan}, 104.0)
    assert task.iterations_per_second == pytest.approx(15.0)
    # Later reports carry only the loss: the validation figures stay.
    assert task.validation == {"f1": 0.5, "precision": 0.6}
    assert task.loss == 0.7  # a NaN loss does not replace the last real one
    text = task.describe()
    for part in ("it 60/100", "loss 0.7000", "15.00 it/s", "ETA 3s", "F1 0.500", "P 0.600"):
        assert part in text


def test_the_trainers_own_eta_wins_over_the_iteration_rate() -> None:
    # A time budget ends training long before the iterations would: only the
    # trainer knows it, and its report says so.
    task = TaskProgress("t")
    task.update({"iteration": 10, "iterations": 100_000}, 100.0)
    task.update({"iteration": 30}, 102.0)
    assert task.eta_seconds == pytest.approx((100_000 - 30) / 10.0)
    task.update({"iteration": 40, "eta_seconds": 540.0}, 103.0)
    assert task.eta_seconds == 540.0
    assert "ETA 9m00s" in task.describe()


def test_job_progress_tracks_stages_and_tasks_apart() -> None:
    job = JobProgress("j")
    change = job.update(ProgressEvent("j", "RUNNING", "ingest", 1, 4, voxels_per_second=2e6))
    assert change.stage is not None and change.task is None
    assert "1/4 tasks" in change.stage.describe() and "2.00 Mvox/s" in change.stage.describe()
    # An event without counts (a task's report) keeps the stage's counts.
    job.update(ProgressEvent("j", "RUNNING", "ingest", task_id="x", message="busy"))
    assert (job.stages["ingest"].tasks_done, job.stages["ingest"].tasks_total) == (1, 4)
    assert job.tasks == {}
    job.update(ProgressEvent("j", "SUCCEEDED", "ingest", 4, 4))
    assert job.state == "SUCCEEDED"


def test_lines_are_printed_as_reports_arrive_when_not_a_terminal() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=200)
    final = follow_job(
        Replay(training_stream()), "j", console=console, display="live", line_interval_s=3.0
    )
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED
    lines = buffer.getvalue().splitlines()
    member = [line for line in lines if line.startswith("train        1fm: ")]
    # One line per 3 s of the stream (from the last line), and every validation.
    assert [line.split("it ")[1].split("/")[0] for line in member] == ["10", "35", "70"]
    assert "val val loss 0.400 P 0.700 R 0.550 F1 0.610" in member[1]
    assert "10.00 it/s" in member[2] and "ETA" in member[2]
    assert lines[0].startswith("train") and "0/2 tasks" in lines[0]
    assert "2/2 tasks" in lines[-2] and lines[-1] == "job j SUCCEEDED"


def test_json_lines_carry_the_event_and_the_derived_figures() -> None:
    stream = io.StringIO()
    events = [*training_stream()]
    events.insert(2, report(1.5, 15, loss=math.inf))
    follow_job(
        Replay(events), "j", console=Console(file=io.StringIO()), display="json", stream=stream
    )
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(records) == len(events)
    assert all(r["event"] == "progress" and r["job_id"] == "j" for r in records)
    trained = [r for r in records if "training" in r]
    assert [r["training"]["iteration"] for r in trained] == [
        10,
        15,
        20,
        30,
        35,
        40,
        50,
        60,
        70,
        80,
        90,
    ]
    assert "loss" not in trained[1]["metrics"]  # not finite: left out, the line stays JSON
    assert trained[-1]["training"]["validation"]["f1"] == 0.61
    assert trained[-1]["training"]["eta_seconds"] == pytest.approx(1.0)
    assert records[-1]["state"] == "SUCCEEDED" and records[-1]["tasks_done"] == 2


def test_the_live_display_draws_stage_and_member_rows() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160)
    follow_job(Replay(training_stream()), "j", console=console, display="live")
    text = buffer.getvalue()
    assert (
        "  1fm" in text and "train/1fm" not in text and "it 90/100" in text and "F1 0.610" in text
    )


def test_json_needs_a_stream() -> None:
    with pytest.raises(ValueError, match="stream"):
        follow_job(Replay([]), "j", console=Console(file=io.StringIO()), display="json")
