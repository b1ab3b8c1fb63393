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


@pytest.mark.parametrize("role", ["training", "inference"])
def test_compute_roles_fill_the_cores_with_half_of_them_per_task(
    given: Settings, role: str
) -> None:
    assert compute_environment(role, given, 8) == {
        "DEEP3M_TORCH_THREADS": "4",
        "DEEP3M_WORKER_CAPACITY": "2",
    }
    assert compute_environment(role, given, 2) == {
        "DEEP3M_TORCH_THREADS": "1",
        "DEEP3M_WORKER_CAPACITY": "2",
    }
    assert compute_environment(role, given, 1)["DEEP3M_WORKER_CAPACITY"] == "1"


def test_other_roles_get_half_the_cores_and_no_capacity(given: Settings) -> None:
    assert compute_environment("postprocess", given, 8) == {"DEEP3M_TORCH_THREADS": "4"}


def test_the_operators_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEP3M_TORCH_THREADS", "1")
    env = compute_environment("inference", Settings(), 4)
    # Threads given: as many blocks at once as fill the cores.
    assert env == {"DEEP3M_TORCH_THREADS": "1", "DEEP3M_WORKER_CAPACITY": "4"}
    monkeypatch.setenv("DEEP3M_WORKER_CAPACITY", "3")
    assert compute_environment("inference", Settings(), 4)["DEEP3M_WORKER_CAPACITY"] == "3"
