"""Build (and push) both deep3m images with whichever container engine is here.

    python docker/images.py [--registry R] [--version V] [--push] [--engine E]
    make images REGISTRY=111122223333.dkr.ecr.us-east-1.amazonaws.com PUSH=1

Engines, first usable wins: docker (its daemon must answer), podman, buildah;
``--engine`` or ``$DEEP3M_IMAGE_ENGINE`` picks one. Each image is tagged
``<registry>/<repository>:<version>``; with ``--push`` the registry digest of
each pushed image is recorded. The result goes to ``build/images.json`` and
``build/images-values.yaml`` (``helm install ... -f build/images-values.yaml``
pins the chart to those digests). Exit status 2 with a message naming what to
install when no engine is usable.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("docker", "podman", "buildah")
# flavor → (Dockerfile, repository); the chart's image.cpu / image.cuda.
IMAGES = {
    "cpu": ("docker/Dockerfile.cpu", "deep3m"),
    "cuda": ("docker/Dockerfile.cuda", "deep3m-cuda"),
}
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class ImageError(Exception):
    """A build step failed, or nothing can build here; the message says what to do."""


@dataclass(frozen=True)
class Built:
    flavor: str
    ref: str
    digest: str | None


def _run(argv: list[str], *, capture: bool = False) -> str:
    print("+", " ".join(argv), flush=True)
    result = subprocess.run(argv, cwd=REPO, text=True, capture_output=capture, check=False)
    if result.returncode != 0:
        detail = (result.stderr or "").strip() if capture else ""
        raise ImageError(f"{argv[0]} {argv[1]} failed (exit {result.returncode}) {detail}".strip())
    return result.stdout if capture else ""


def _usable(engine: str) -> str | None:
    """Why ``engine`` cannot build here, or None when it can."""
    if shutil.which(engine) is None:
        return "not installed"
    probe = {"docker": ["docker", "info"], "podman": ["podman", "info"]}.get(engine)
    if probe is not None:
        result = subprocess.run(probe, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            return "installed, but its engine does not answer (`" + " ".join(probe) + "` fails)"
    return None


def choose_engine(wanted: str | None) -> str:
    candidates = [wanted] if wanted else list(ENGINES)
    reasons = {engine: _usable(engine) for engine in candidates}
    for engine, reason in reasons.items():
        if reason is None:
            return engine
    listed = "; ".join(f"{engine}: {reason}" for engine, reason in reasons.items())
    raise ImageError(
        f"no container engine can build the images here ({listed}). Install Docker "
        "(with a running daemon), Podman or Buildah, or let CI build them "
        "(.github/workflows/images.yml)."
    )


def _digest_of_push(engine: str, ref: str) -> str:
    if engine == "docker":
        _run(["docker", "push", ref])
        out = _run(
            ["docker", "image", "inspect", "--format", "{{json .RepoDigests}}", ref], capture=True
        )
        repository = ref.rsplit(":", 1)[0]
        for entry in json.loads(out or "[]"):
            name, _, digest = entry.partition("@")
            if name == repository and _DIGEST.fullmatch(digest):
                return digest
        raise ImageError(f"docker pushed {ref} but reports no digest for {repository}")
    with tempfile.TemporaryDirectory() as tmp:
        digest_file = Path(tmp) / "digest"
        _run([engine, "push", "--digestfile", str(digest_file), ref])
        digest = digest_file.read_text().strip() if digest_file.is_file() else ""
    if not _DIGEST.fullmatch(digest):
        raise ImageError(f"{engine} pushed {ref} but wrote no digest ({digest!r})")
    return digest


def build(engine: str, registry: str, version: str, push: bool, platform: str) -> list[Built]:
    built: list[Built] = []
    for flavor, (dockerfile, repository) in IMAGES.items():
        name = f"{registry.rstrip('/')}/{repository}" if registry else repository
        ref = f"{name}:{version}"
        verb = ["bud"] if engine == "buildah" else ["build"]
        _run([engine, *verb, "--platform", platform, "-f", dockerfile, "-t", ref, "."])
        digest = _digest_of_push(engine, ref) if push else None
        built.append(Built(flavor, ref, digest))
    return built


def write_record(built: list[Built], engine: str, registry: str, version: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "engine": engine,
        "registry": registry,
        "version": version,
        "images": {b.flavor: {"ref": b.ref, "digest": b.digest} for b in built},
    }
    (out / "images.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Written by `make images`: pins the chart to the images just built.", "image:"]
    if registry:
        lines.append(f"  registry: {json.dumps(registry)}")
    for b in built:
        lines += [f"  {b.flavor}:", f"    tag: {json.dumps(version)}"]
        if b.digest:
            lines.append(f"    digest: {json.dumps(b.digest)}")
    (out / "images-values.yaml").write_text("\n".join(lines) + "\n")


def _project_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    return match.group(1) if match else "0.0.0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default=os.environ.get("REGISTRY", ""))
    parser.add_argument("--version", default=os.environ.get("VERSION") or _project_version())
    parser.add_argument("--push", action="store_true", default=os.environ.get("PUSH") == "1")
    parser.add_argument("--engine", choices=ENGINES, default=os.environ.get("DEEP3M_IMAGE_ENGINE"))
    parser.add_argument("--platform", default="linux/amd64")
    parser.add_argument("--out", type=Path, default=REPO / "build")
    args = parser.parse_args(argv)
    try:
        if args.push and not args.registry:
            raise ImageError("--push needs a registry (--registry or REGISTRY=...)")
        engine = choose_engine(args.engine)
        built = build(engine, args.registry, args.version, args.push, args.platform)
        write_record(built, engine, args.registry, args.version, args.out)
    except ImageError as exc:
        print(f"make images: {exc}", file=sys.stderr)
        return 2
    for b in built:
        print(f"{b.flavor}: {b.ref}" + (f"@{b.digest}" if b.digest else " (not pushed)"))
    print(f"recorded in {args.out / 'images.json'} and {args.out / 'images-values.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
