"""What a running ``deep3m up`` leaves for the CLI on the same machine.

``deep3m up`` keeps its generated credentials (``runtime.credentials``: CA,
certificate, a client token, a token per worker role) in
``<state>/credentials`` and, while it runs, a record of its role addresses in
``<state>/running/<pid>.json``. ``<state>`` is ``DEEP3M_STATE_DIR``, else
``$XDG_STATE_HOME/deep3m``, else ``~/.local/state/deep3m``; every folder is
0700 and every key and token 0600, so only the user who ran ``up`` can read them.

``local_security(address)`` is how a client on the machine finds them: when
``address`` is one of a running ``up``'s roles, the channel security of its
client (mutual TLS and the client token); otherwise None.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deep3m.runtime.channel import ChannelSecurity
from deep3m.runtime.credentials import Credentials, generate_credentials, read_credentials
from deep3m.runtime.settings import Settings

CREDENTIALS = "credentials"
RUNNING = "running"


def state_dir(settings: Settings | None = None) -> Path:
    """Where ``deep3m up`` keeps its credentials and running records."""
    chosen = (settings or Settings()).state_dir
    if chosen:
        return Path(chosen).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME", "")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "deep3m"


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)  # also when it existed before, made with a looser umask
    return path


def up_credentials(state: Path) -> Credentials:
    """The credentials of ``deep3m up`` under ``state`` (made on first use, then reused)."""
    _private_dir(state)
    folder = _private_dir(state / CREDENTIALS)
    creds = generate_credentials(folder)
    _private_dir(creds.token_dir)
    return creds


@dataclass(frozen=True)
class RunningUp:
    """One running ``deep3m up``: its process, role addresses and credentials folder."""

    pid: int
    addresses: dict[str, str]
    credentials: str  # "" when started with --insecure

    def security(self) -> ChannelSecurity | None:
        if not self.credentials:
            return None
        return read_credentials(self.credentials).client_security()


def _record_path(state: Path, pid: int) -> Path:
    return state / RUNNING / f"{pid}.json"


def record_running(state: Path, up: RunningUp) -> Path:
    """Write the record of a running ``up`` (removed again by ``clear_running``)."""
    folder = _private_dir(state / RUNNING)
    path = _record_path(state, up.pid)
    body = {"pid": up.pid, "addresses": up.addresses, "credentials": up.credentials}
    tmp = folder / f".{up.pid}.json.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f)
    tmp.replace(path)
    return path


def clear_running(state: Path, pid: int) -> None:
    _record_path(state, pid).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not our up
        return False
    return True


def running_ups(state: Path) -> list[RunningUp]:
    """The ``up`` processes recorded under ``state`` that are still alive."""
    folder = state / RUNNING
    found: list[RunningUp] = []
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.json")):
        try:
            body: dict[str, Any] = json.loads(path.read_text())
            up = RunningUp(int(body["pid"]), dict(body["addresses"]), str(body["credentials"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # half-written or foreign: not a record to trust
        if _alive(up.pid):
            found.append(up)
    return found


def _loopback_port(address: str) -> str | None:
    host, sep, port = address.rpartition(":")
    if not sep or host.strip("[]") not in ("127.0.0.1", "localhost", "::1"):
        return None
    return port


def local_security(address: str, settings: Settings | None = None) -> ChannelSecurity | None:
    """The client security of the running ``up`` that serves ``address`` on this
    machine; None when no running ``up`` has a role there (or it runs --insecure)."""
    port = _loopback_port(address)
    if port is None:
        return None
    for up in running_ups(state_dir(settings)):
        if any(_loopback_port(a) == port for a in up.addresses.values()):
            return up.security()
    return None
