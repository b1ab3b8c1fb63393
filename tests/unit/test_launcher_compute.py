"""The compute settings ``deep3m up`` gives each role on a machine of n cores."""

from __future__ import annotations

import pytest
from deep3m.launcher.local import compute_environment
from deep3m.runtime.settings import Settings


@pytest.fixture
def given(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("DEEP3M_TORCH_THREADS", raising=False)
    monkeypatch.delenv("DEEP3M_WORKER_CAPACITY", raising=False)
    return Settings()


@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_inference_computes_one_block_on_every_core(given: Settings, cpus: int) -> None:
    env = compute_environment("inference", given, cpus)
    assert env == {"DEEP3M_TORCH_THREADS": str(cpus), "DEEP3M_WORKER_CAPACITY": "1"}


def test_training_runs_two_members_on_half_the_cores_each(given: Settings) -> None:
    env = compute_environment("training", given, 8)
    assert env == {"DEEP3M_TORCH_THREADS": "4", "DEEP3M_WORKER_CAPACITY": "2"}
    # Other roles get half the cores and no capacity (they keep their own default).
    assert compute_environment("postprocess", given, 8) == {"DEEP3M_TORCH_THREADS": "4"}
    assert compute_environment("training", given, 1)["DEEP3M_TORCH_THREADS"] == "1"


def test_the_operators_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEP3M_TORCH_THREADS", "1")
    env = compute_environment("inference", Settings(), 4)
    # Threads given: as many blocks at once as fill the cores.
    assert env == {"DEEP3M_TORCH_THREADS": "1", "DEEP3M_WORKER_CAPACITY": "4"}
    monkeypatch.setenv("DEEP3M_WORKER_CAPACITY", "3")
    assert compute_environment("inference", Settings(), 4)["DEEP3M_WORKER_CAPACITY"] == "3"
