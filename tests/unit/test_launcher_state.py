"""How the CLI finds the credentials of a running `deep3m up`: records, private folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from deep3m.core.errors import InvalidArgumentError
from deep3m.launcher.state import (
    RunningUp,
    clear_running,
    local_security,
    record_running,
    running_ups,
    state_dir,
    up_credentials,
)
from deep3m.runtime.settings import Settings


def test_the_state_folder_follows_the_setting_then_xdg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert state_dir(Settings(state_dir=str(tmp_path / "s"))) == tmp_path / "s"
    monkeypatch.delenv("DEEP3M_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir(Settings()) == tmp_path / "xdg" / "deep3m"


def test_a_running_up_is_found_by_any_of_its_loopback_addresses(tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path))
    tmp_path.chmod(0o755)  # a looser folder made beforehand is tightened
    creds = up_credentials(tmp_path)
    assert tmp_path.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "credentials").stat().st_mode & 0o777 == 0o700
    addresses = {"scheduler": "127.0.0.1:41001", "tiling": "127.0.0.1:41002"}
    record = record_running(tmp_path, RunningUp(os.getpid(), addresses, str(creds.folder)))
    assert record.stat().st_mode & 0o077 == 0
    found = local_security("localhost:41002", settings)
    assert found is not None and found.tls and found.token == creds.client_token
    assert found.cert_file == str(creds.cert_file) and found.ca_file == str(creds.ca_file)
    # Another port, or a host that is not this machine, is not that up's.
    assert local_security("127.0.0.1:41003", settings) is None
    assert local_security("scheduler.example.org:41001", settings) is None
    clear_running(tmp_path, os.getpid())
    assert local_security("127.0.0.1:41001", settings) is None


def test_records_of_ended_or_insecure_ups_give_nothing(tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(ended.stdout)
    record_running(tmp_path, RunningUp(dead_pid, {"scheduler": "127.0.0.1:41001"}, "/nowhere"))
    (tmp_path / "running" / "half.json").write_text('{"pid": ')
    assert running_ups(tmp_path) == []
    assert local_security("127.0.0.1:41001", settings) is None
    record_running(tmp_path, RunningUp(os.getpid(), {"scheduler": "127.0.0.1:41001"}, ""))
    assert local_security("127.0.0.1:41001", settings) is None  # --insecure


def test_a_record_whose_credentials_are_gone_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    record_running(tmp_path, RunningUp(os.getpid(), {"scheduler": "127.0.0.1:41001"}, str(missing)))
    with pytest.raises(InvalidArgumentError, match=r"cannot read the token .*gone"):
        local_security("127.0.0.1:41001", Settings(state_dir=str(tmp_path)))
