"""The CPU and CUDA images: hadolint, and the properties the chart relies on.

No Docker engine runs here, so the images are linted and read, not built.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "cpu": REPO / "docker" / "Dockerfile.cpu",
    "cuda": REPO / "docker" / "Dockerfile.cuda",
}


def _final_stage(text: str) -> str:
    return text[text.rindex("\nFROM ") :]


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_hadolint_passes(flavor: str, hadolint: str) -> None:
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", str(DOCKERFILES[flavor])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_problems(tmp_path: Path, hadolint: str) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    result = subprocess.run(
        [hadolint, str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0 and "DL3007" in result.stdout


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_image_runs_deep3m_serve_as_non_root(flavor: str) -> None:
    text = DOCKERFILES[flavor].read_text()
    final = _final_stage(text)
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2, "multi-stage"
    assert re.search(r"^USER 10001:10001$", final, re.MULTILINE)
    assert 'ENTRYPOINT ["deep3m"]' in final and 'CMD ["serve", ' in final
    assert "HEALTHCHECK" in final and "deep3m.runtime.healthcheck" in final
    # Writable paths point into /tmp, the chart's emptyDir on a read-only root.
    for var in ("HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TORCH_HOME"):
        assert re.search(rf"\b{var}=/tmp\b", final), var
    assert "DEEP3M_GRPC_PORT=50051" in final and "DEEP3M_METRICS_PORT=9090" in final
    assert "-c constraints.txt" in text


@pytest.mark.parametrize(("flavor", "index"), [("cpu", "whl/cpu"), ("cuda", "whl/${TORCH_CUDA}")])
def test_torch_build_and_version_follow_constraints(flavor: str, index: str) -> None:
    text = DOCKERFILES[flavor].read_text()
    assert f"https://download.pytorch.org/{index}" in text
    pinned = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.MULTILINE)
    assert pinned is not None
    assert f"ARG TORCH_VERSION={pinned.group(1)}" in text


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    # Deny everything, then allow exactly what the Dockerfiles COPY.
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied: set[str] = set()
    for path in DOCKERFILES.values():
        for line in path.read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                copied.update(p.rstrip("/").removeprefix("./") for p in line.split()[1:-1])
    assert copied == allowed


def test_entrypoint_and_health_module_exist() -> None:
    from deep3m.client.cli import app

    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    assert "serve" in names
    result = subprocess.run(
        [sys.executable, "-m", "deep3m.runtime.healthcheck", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and "--store" in result.stdout
