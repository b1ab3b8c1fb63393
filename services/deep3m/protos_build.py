"""Generate the Python gRPC code from ``protos/`` into ``services/deep3m/v1``.

``python -m deep3m.protos_build`` writes the files; ``--check`` compares them
with what is on disk and exits non-zero when they are out of date (a file that
differs, is missing, or is left over from a proto that no longer exists).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "services"
GENERATED_DIR = OUT_ROOT / "deep3m" / "v1"
# Suffixes protoc writes; other files in the folder (caches) are not ours to judge.
_GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    from grpc_tools import protoc  # dev dependency, needed only to regenerate

    protos = sorted((proto_root / "deep3m" / "v1").glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root / 'deep3m' / 'v1'}")
    include = Path(protoc.__file__).parent / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--pyi_out={out_root}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    out_dir = out_root / "deep3m" / "v1"
    (out_dir / "__init__.py").write_text('"""Generated gRPC code; run `make protos`."""\n')
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def stale_files(generated_dir: Path | None = None, proto_root: Path | None = None) -> list[str]:
    """Names of generated files in ``generated_dir`` that differ from a fresh build.

    A file is stale when its content differs, when it is missing, or when it
    is generated code no current proto produces.
    """
    generated_dir = generated_dir or GENERATED_DIR
    proto_root = proto_root or PROTO_ROOT
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), proto_root)
        fresh_names = {p.name for p in fresh}
        stale = [
            p.name
            for p in fresh
            if not (generated_dir / p.name).is_file()
            or not filecmp.cmp(p, generated_dir / p.name, shallow=False)
        ]
    if generated_dir.is_dir():
        stale += sorted(
            p.name
            for p in generated_dir.iterdir()
            if p.is_file() and p.name.endswith(_GENERATED_SUFFIXES) and p.name not in fresh_names
        )
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report out-of-date files")
    ns = parser.parse_args(argv)
    if not ns.check:
        for path in generate(OUT_ROOT):
            print(path.relative_to(ROOT))
        return 0
    stale = stale_files()
    if stale:
        print("generated code is out of date: run `make protos` (" + ", ".join(stale) + ")")
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
