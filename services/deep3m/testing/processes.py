"""Processes for tests that kill things: start a role or a Python module as its own
process, stop it, and wait for the fallout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


def spawn_module(
    module: str, args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m module args…`` in its own session (a SIGKILL of it reaches no one
    else), output into ``log_path``, ``env`` over this process's environment."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def spawn_role(
    role: str, log_path: Path, env: Mapping[str, str], port: int
) -> subprocess.Popen[bytes]:
    """``deep3m serve <role>`` on 127.0.0.1:``port`` with ``env`` (``DEEP3M_*`` settings)."""
    return spawn_module(
        "deep3m.client.cli",
        ["serve", role],
        log_path,
        {
            "DEEP3M_GRPC_PORT": str(port),
            "DEEP3M_HOST": "127.0.0.1",
            "DEEP3M_METRICS_PORT": "0",
            **env,
        },
    )


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
    return int(proc.returncode)


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent that never reaps it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel, which counts zombies as alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: Iterable[int], timeout_s: float) -> list[int]:
    """Wait until none of ``pids`` runs, at most ``timeout_s``; the ones still running."""
    pids = list(pids)
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        pause.wait(0.1)
    return left
