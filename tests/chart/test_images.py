"""`make images` and the CI workflow that builds, scans and pushes the images.

No container engine runs here, so ``docker/images.py`` is exercised twice:
with the engines this machine has (none usable: the clear refusal), and with
a stand-in ``podman`` on ``PATH`` (a shell script that logs its arguments and
writes a digest file as ``podman push --digestfile`` does) to check the
commands given and the digests recorded. Real builds happen in CI
(``.github/workflows/images.yml``), which is linted here with actionlint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "docker" / "images.py"
WORKFLOWS = REPO / ".github" / "workflows"
DIGEST = "sha256:" + "d" * 64


def _run_images(args: list[str], path: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REGISTRY", "PUSH", "VERSION")}
    env.pop("DEEP3M_IMAGE_ENGINE", None)
    env["PATH"] = path
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "build"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _stand_in(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_no_usable_engine_is_a_clear_refusal(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    # A docker client without a daemon, as on this machine.
    _stand_in(bin_dir, "docker", 'test "$1" = info && { echo "no daemon" >&2; exit 1; }\n')
    result = _run_images([], str(bin_dir), tmp_path)
    assert result.returncode == 2
    assert "no container engine can build the images here" in result.stderr
    assert "docker: installed, but its engine does not answer" in result.stderr
    assert "podman: not installed" in result.stderr and "buildah: not installed" in result.stderr
    assert not (tmp_path / "build").exists()


def test_push_without_registry_is_refused(tmp_path: Path) -> None:
    result = _run_images(["--push"], str(tmp_path), tmp_path)
    assert result.returncode == 2 and "--push needs a registry" in result.stderr


def test_builds_both_images_and_records_digests(tmp_path: Path, render: Any) -> None:
    bin_dir, log = tmp_path / "bin", tmp_path / "podman.log"
    _stand_in(
        bin_dir,
        "podman",
        f'echo "$*" >> {log}\nif [ "$1" = push ]; then echo ' + DIGEST + ' > "$3"; fi\n',
    )
    registry = "111122223333.dkr.ecr.us-east-1.amazonaws.com"
    result = _run_images(
        ["--registry", registry, "--version", "0.1.0", "--push"], str(bin_dir), tmp_path
    )
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "info"
    builds = [c for c in calls if c.startswith("build ")]
    assert builds == [
        f"build --platform linux/amd64 -f docker/Dockerfile.cpu -t {registry}/deep3m:0.1.0 .",
        f"build --platform linux/amd64 -f docker/Dockerfile.cuda -t {registry}/deep3m-cuda:0.1.0 .",
    ]
    pushes = [c.split()[-1] for c in calls if c.startswith("push ")]
    assert pushes == [f"{registry}/deep3m:0.1.0", f"{registry}/deep3m-cuda:0.1.0"]
    record = json.loads((tmp_path / "build" / "images.json").read_text())
    assert record["engine"] == "podman"
    assert record["images"]["cuda"] == {"ref": f"{registry}/deep3m-cuda:0.1.0", "digest": DIGEST}
    # The values file pins the chart to exactly these images.
    values = yaml.safe_load((tmp_path / "build" / "images-values.yaml").read_text())
    rendered = render({**values, "image": {**values["image"]}})
    for _, spec in rendered.pod_specs():
        image = spec["containers"][0]["image"]
        assert image.startswith(f"{registry}/deep3m") and image.endswith(f"@{DIGEST}")


def test_workflows_pass_actionlint(actionlint: str) -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert files
    result = subprocess.run(
        [actionlint, "-shellcheck=", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path, actionlint: str) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n"
        "    steps:\n      - run: echo ${{ github.nonexistent_context }}\n"
    )
    result = subprocess.run(
        [actionlint, "-shellcheck=", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0 and "nonexistent_context" in result.stdout


def test_workflow_builds_scans_then_pushes_both_images_with_digests() -> None:
    workflow = yaml.safe_load((WORKFLOWS / "images.yml").read_text())
    job = workflow["jobs"]["image"]
    flavors = {m["flavor"]: m["dockerfile"] for m in job["strategy"]["matrix"]["include"]}
    assert flavors == {"cpu": "docker/Dockerfile.cpu", "cuda": "docker/Dockerfile.cuda"}
    uses = [step.get("uses", "").split("@")[0] for step in job["steps"]]
    build, scan = uses.index("docker/build-push-action"), uses.index("aquasecurity/trivy-action")
    push = len(uses) - 1 - uses[::-1].index("docker/build-push-action")
    assert build < scan < push, "nothing is pushed before the scan"
    assert job["steps"][build]["with"]["load"] is True
    assert job["steps"][scan]["with"]["exit-code"] == "1"
    assert job["steps"][push]["with"]["push"] is True
    recorded = next(s for s in job["steps"] if s.get("name") == "Record the digest")
    assert "steps.push.outputs.digest" in recorded["env"]["DIGEST"]
    # Least privilege: read-only by default, package writes in the job only.
    assert workflow["permissions"] == {"contents": "read"}


def test_docker_digest_comes_from_the_pushed_repository(tmp_path: Path) -> None:
    bin_dir, log = tmp_path / "bin", tmp_path / "docker.log"
    registry = "registry.lab.example.org"
    other = "sha256:" + "e" * 64
    # `docker image inspect` lists digests of every repository the image was pushed to.
    _stand_in(
        bin_dir,
        "docker",
        f'echo "$*" >> {log}\n'
        'if [ "$1" = image ]; then repo="${5%:*}"; '
        f'printf \'["mirror.example.org/x@{other}", "%s@{DIGEST}"]\' "$repo"; fi\n',
    )
    result = _run_images(["--registry", registry, "--push"], str(bin_dir), tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "build" / "images.json").read_text())
    assert record["engine"] == "docker"
    assert {i["digest"] for i in record["images"].values()} == {DIGEST}
    assert sum(line.startswith("push ") for line in log.read_text().splitlines()) == 2
