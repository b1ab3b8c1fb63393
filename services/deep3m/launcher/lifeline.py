"""Tie the role processes' lives to the launcher's: when ``deep3m up`` dies, so do they.

On Linux each role asks the kernel for SIGTERM when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), set between fork and exec. The kernel watches the
*thread* that forked, so the launcher starts and restarts roles from one
long-lived thread. Elsewhere a small watchdog process holds the read end of a
pipe from the launcher: the pipe closes however the launcher dies (even
SIGKILL), and the watchdog then terminates every process group it was told of.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import IO

PR_SET_PDEATHSIG = 1


def parent_death_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking for SIGTERM when the parent dies; None where prctl is absent."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    # Resolved in the parent: the child between fork and exec must not load libraries.
    parent = os.getpid()

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


class Watchdog:
    """A separate process that terminates the tracked process groups once we die."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "deep3m.launcher.lifeline"],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
        if self._proc.stdin is None:
            raise RuntimeError("the watchdog has no stdin pipe")
        self._pipe: IO[bytes] = self._proc.stdin
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def track(self, pgid: int) -> None:
        with self._lock:
            self._pipe.write(f"{pgid}\n".encode())
            self._pipe.flush()

    def close(self) -> None:
        """A clean stop: the roles are already stopped, so tell the watchdog to leave them."""
        with self._lock:
            self._pipe.write(b"done\n")
            self._pipe.close()
        self._proc.wait(timeout=10)


def watch(lines: IO[bytes]) -> None:
    """Read process groups, one per line, until EOF; on EOF without ``done`` end them."""
    groups: list[int] = []
    for line in lines:
        text = line.strip()
        if text == b"done":
            return
        if text:
            groups.append(int(text))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, not us
    watch(sys.stdin.buffer)
