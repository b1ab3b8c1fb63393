"""A real headless Chromium for tests: screenshots of pages served on loopback."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
# No network beyond loopback, no profile state, no updater or sync traffic.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("no chromium on PATH")
    with tempfile.TemporaryDirectory(prefix="deep3m-chromium-") as profile:
        return subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip


def screenshot(
    url: str,
    out: Path,
    *,
    width: int = 1000,
    height: int = 700,
    budget_ms: int = 20_000,
    timeout_s: float = 180.0,
) -> Path:
    """Render ``url`` for ``budget_ms`` of virtual time and save a PNG to ``out``."""
    args = [f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}"]
    done = _run([*args, f"--screenshot={out}", url], timeout_s)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr}")
    return out


def dump_dom(url: str, *, budget_ms: int = 5_000, timeout_s: float = 120.0) -> str:
    """The page's DOM after ``budget_ms`` of virtual time, as Chromium serialises it."""
    done = _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout_s)
    if done.returncode:
        raise RuntimeError(f"chromium failed (exit {done.returncode}): {done.stderr}")
    return done.stdout
