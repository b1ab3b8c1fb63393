"""Roles die with their launcher: the parent-death signal, the watchdog, and port checks."""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from deep3m.launcher.lifeline import watch
from deep3m.launcher.local import PortInUseError, free_port, port_in_use
from deep3m.testing.processes import alive, wait_gone


@pytest.fixture()
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_watch_ends_the_groups_it_was_told_of_when_the_pipe_closes(
    sleeper: subprocess.Popen[bytes],
) -> None:
    watch(io.BytesIO(f"{sleeper.pid}\n".encode()))
    assert sleeper.wait(timeout=10) == -signal.SIGTERM


def test_watch_leaves_the_groups_after_a_clean_stop(sleeper: subprocess.Popen[bytes]) -> None:
    watch(io.BytesIO(f"{sleeper.pid}\ndone\n".encode()))
    assert sleeper.poll() is None


# A launcher in miniature: starts a child the given way, prints its pid, waits to be killed.
LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys
    from deep3m.launcher.lifeline import Watchdog, parent_death_hook
    if sys.argv[1] == "watchdog":
        watchdog = Watchdog()
        child = subprocess.Popen(["sleep", "120"], start_new_session=True)
        watchdog.track(child.pid)
    else:
        child = subprocess.Popen(
            ["sleep", "120"], start_new_session=True, preexec_fn=parent_death_hook()
        )
    print(child.pid, flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(
            "prctl",
            marks=pytest.mark.skipif(
                not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only"
            ),
        ),
        "watchdog",
    ],
)
def test_child_dies_with_a_launcher_killed_by_sigkill(how: str) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, how], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as launcher:
        try:
            assert launcher.stdout is not None
            child = int(launcher.stdout.readline())
            assert alive(child)
        finally:
            launcher.kill()
        assert launcher.wait(timeout=10) == -signal.SIGKILL
    assert wait_gone([child], 30) == []


def test_port_in_use_sees_a_listener_and_names_it() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        assert port_in_use(port)
    assert not port_in_use(free_port())
    err = PortInUseError({"scheduler": port})
    assert str(port) in err.message and "scheduler" in err.message and err.field == "port"
