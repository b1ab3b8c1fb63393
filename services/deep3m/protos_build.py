"""Generate the Python gRPC code from ``protos/`` into ``services/deep3m/v1``.

``python -m deep3m.protos_build`` writes the files; ``--check`` compares them
with what is on disk and exits non-zero when they are out of date.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "services"
GENERATED_DIR = OUT_ROOT / "deep3m" / "v1"


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency, needed only to regenerate

    protos = sorted((PROTO_ROOT / "deep3m" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    ns = parser.parse_args()
    if not ns.check:
        for path in generate(OUT_ROOT):
            print(path.relative_to(ROOT))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [
            p.name for p in fresh if not filecmp.cmp(p, GENERATED_DIR / p.name, shallow=False)
        ] if GENERATED_DIR.exists() else [p.name for p in fresh]
    if stale:
        print("generated code is out of date: run `make protos` (" + ", ".join(stale) + ")")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
