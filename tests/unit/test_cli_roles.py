"""`deep3m serve` refuses what it cannot run, with a message and a non-zero exit."""

from __future__ import annotations

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
