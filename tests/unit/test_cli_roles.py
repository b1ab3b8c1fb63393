"""`deep3m serve` and `deep3m up` refuse what they cannot run: a message, a non-zero exit."""

from __future__ import annotations

from pathlib import Path

import pytest
from deep3m.client.cli import app
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("clean_env")


def test_serve_unknown_role_exits_non_zero_with_a_clear_message() -> None:
    result = CliRunner().invoke(app, ["serve", "frobnicate"])
    assert result.exit_code != 0
    assert "unknown role 'frobnicate'" in result.output
    assert "postprocess" in result.output  # the choices are listed


def test_serve_with_a_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEP3M_GRPC_PORT", "not-a-port")
    result = CliRunner().invoke(app, ["serve", "postprocess"])
    assert result.exit_code != 0
    assert "DEEP3M_GRPC_PORT" in result.output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--roles", "scheduler,frobnicate"], "frobnicate"),
        (["--port", "scheduler"], "ROLE=N"),
        (["--port", "tiling=70000"], "tiling=70000"),
        (["--roles", "scheduler", "--port", "tiling=0"], "tiling=0"),
    ],
)
def test_up_refuses_bad_roles_and_ports_before_starting_anything(
    args: list[str], says: str, tmp_path: Path
) -> None:
    result = CliRunner().invoke(app, ["up", "--store", str(tmp_path / "s"), *args])
    assert result.exit_code == 2
    assert says in result.output
    assert not (tmp_path / "s").exists()
