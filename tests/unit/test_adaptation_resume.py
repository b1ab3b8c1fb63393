"""An adaptation run stopped after a stage (or a candidate) continues after it.

Tiny synthetic domains on a real file store. The stop goes through the runtime's
cancellation, set by the journal the moment a record is complete. Every method
here is deterministic on the CPU (one thread), so the resumed run must end where
an uninterrupted one does: same candidates, same figures, same chosen weights.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from deep3m.core.errors import CancelledError
from deep3m.core.store import Store
from deep3m.training.adaptation.candidates import Candidate
from deep3m.training.adaptation.journal import StageJournal
from deep3m.training.adaptation.loops import StageLog, StageState
from deep3m.training.adaptation.methods import AdaptationResult, adapt
from deep3m.training.adaptation.runtime import StageProgress, StageRuntime, use
from test_adaptation_methods import SOURCE, SOURCE_VAL, TARGET, TINY
from torch import nn

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FINGERPRINT = {"run": "resume-test"}


class StoppingJournal(StageJournal):
    """Sets ``stop`` once the record named ``after`` is complete (the worker going away)."""

    def __init__(self, store: Store, prefix: str, after: str, stop: threading.Event) -> None:
        super().__init__(store, prefix, FINGERPRINT)
        self.after, self.stop = after, stop

    def save_stage(
        self, index: int, name: str, stage_log: StageLog, modules: Mapping[str, nn.Module]
    ) -> None:
        super().save_stage(index, name, stage_log, modules)
        if name == self.after:
            self.stop.set()

    def save_candidate(self, candidate: Candidate, state: StageState, sampler: Any) -> None:
        super().save_candidate(candidate, state, sampler)
        if candidate.name == self.after:
            self.stop.set()


def _run(
    method: str, journal: StageJournal | None, stop: threading.Event | None = None
) -> tuple[AdaptationResult, list[tuple[str, int]]]:
    """The result and every (stage, iteration) the loops ran."""
    ran: list[tuple[str, int]] = []

    def seen(p: StageProgress) -> None:
        ran.append((p.stage, p.iteration))

    runtime = StageRuntime(on_progress=seen, cancelled=stop, progress_seconds=0.0)
    with use(runtime):
        result = adapt(
            replace(TINY, method=method),
            SOURCE,
            TARGET,
            source_validation=SOURCE_VAL,
            journal=journal,
        )
    return result, ran


_REFERENCE: dict[str, tuple[AdaptationResult, list[tuple[str, int]]]] = {}


def reference(method: str) -> tuple[AdaptationResult, list[tuple[str, int]]]:
    if method not in _REFERENCE:
        _REFERENCE[method] = _run(method, None)
    return _REFERENCE[method]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    yield Store(f"file://{tmp_path / 'store'}")


def _same_outcome(got: AdaptationResult, want: AdaptationResult) -> None:
    assert [c.figures() for c in got.candidates] == [c.figures() for c in want.candidates]
    assert got.chosen.name == want.chosen.name
    assert got.metrics["selected"] == want.metrics["selected"]
    for key, value in want.chosen.state.items():
        assert torch.equal(got.chosen.state[key], value), key
    assert [s.name for s in got.stages] == [s.name for s in want.stages]
    assert [s.losses for s in got.stages] == [s.losses for s in want.stages]


# (method, the record after which the run is stopped, the stages that must not run again)
CASES = [
    ("translation", "translation-cut", {"translation-cut"}),
    ("ssl", "ssl-pretext", {"ssl-pretext"}),
    ("multitask", "ynet-stage1", {"ynet-stage1"}),
    ("multitask", "ynet-stage2", {"ynet-stage1", "ynet-stage2"}),
    ("ssl", "segmentation-000002", {"ssl-pretext"}),
    ("none", "segmentation-000002", set()),
    ("histogram-online", "segmentation-000002", set()),
    ("translation", "segmentation-000002", {"translation-cut"}),
]


@pytest.mark.parametrize(("method", "after", "done"), CASES)
def test_a_stopped_run_continues_after_its_last_finished_stage(
    method: str, after: str, done: set[str], store: Store
) -> None:
    want, want_ran = reference(method)
    stop = threading.Event()
    with pytest.raises(CancelledError):
        _run(method, StoppingJournal(store, "m/1fm/adaptation", after, stop), stop)

    got, ran = _run(method, StageJournal(store, "m/1fm/adaptation", FINGERPRINT))

    assert not {stage for stage, _ in ran} & done  # finished stages are not run again
    assert set(got.resumed["stages"]) == done
    if after.startswith("segmentation-"):
        # The candidate already scored is taken over: training goes on after its step.
        assert got.resumed["candidates"] == [after]
        assert min(i for s, i in ran if s == "segmentation") == 3
    else:
        assert got.resumed["candidates"] == []
        assert [i for s, i in ran if s == "segmentation"] == [1, 2, 3, 4]
    unsupervised = sum(s.iterations for s in want.stages if s.name in done)
    candidates = 2 if after.startswith("segmentation-") else 0
    assert got.resumed["iterations"] == unsupervised + candidates
    assert got.metrics["resumed"] == got.resumed
    assert len(ran) < len(want_ran)
    _same_outcome(got, want)


def _corrupt(store: Store, key: str, how: str) -> None:
    if how == "truncated":
        store.write_bytes(key, store.read_bytes(key)[:40])
    elif how == "garbage":
        store.write_bytes(key, b"{not json at all")
    elif how == "missing":
        store.delete(key)
    elif how == "foreign":
        doc = store.read_json(key)
        store.write_json(key, {**doc, "fingerprint": {"run": "another"}})
    elif how == "wrong-shapes":
        from safetensors.torch import save

        store.write_bytes(key, save({"net.weight": torch.zeros(3)}))


STAGE = "m/1fm/adaptation/stage-00-ynet-stage1"
CANDIDATE = "m/1fm/adaptation/candidate-00000002"


@pytest.mark.parametrize(
    ("key", "how"),
    [
        (f"{STAGE}.safetensors", "truncated"),
        (f"{STAGE}.safetensors", "missing"),
        (f"{STAGE}.json", "garbage"),
        (f"{STAGE}.json", "missing"),
        (f"{STAGE}.json", "foreign"),
        (f"{CANDIDATE}.safetensors", "wrong-shapes"),
        (f"{CANDIDATE}.json", "garbage"),
    ],
)
def test_a_corrupt_or_partial_record_is_run_again(key: str, how: str, store: Store) -> None:
    want, _ = reference("multitask")
    stop = threading.Event()
    with pytest.raises(CancelledError):
        _run(
            "multitask",
            StoppingJournal(store, "m/1fm/adaptation", "segmentation-000002", stop),
            stop,
        )
    _corrupt(store, key, how)

    got, ran = _run("multitask", StageJournal(store, "m/1fm/adaptation", FINGERPRINT))

    stages_run = {stage for stage, _ in ran}
    if key.startswith(STAGE):
        # Stage 1 is run again, and everything after it: its records went with it.
        assert stages_run == {"ynet-stage1", "ynet-stage2", "segmentation"}
        assert got.resumed == {"stages": [], "candidates": [], "iterations": 0}
    else:
        assert stages_run == {"segmentation"}
        assert got.resumed["stages"] == ["ynet-stage1", "ynet-stage2"]
        assert got.resumed["candidates"] == []
        assert [i for s, i in ran if s == "segmentation"] == [1, 2, 3, 4]
    _same_outcome(got, want)
    # What the re-run wrote is whole again: a third run takes over everything.
    again, ran_again = _run("multitask", StageJournal(store, "m/1fm/adaptation", FINGERPRINT))
    assert ran_again == []
    assert again.resumed["candidates"] == ["segmentation-000002", "segmentation-000004"]
    _same_outcome(again, want)
