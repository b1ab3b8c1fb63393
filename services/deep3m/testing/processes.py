"""Whether processes still run, for tests that kill things and wait for the fallout."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path


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
