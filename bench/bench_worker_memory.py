"""Peak memory of an inference worker predicting a volume 1× and 4× as large.

Each size runs in a fresh worker process (``deep3m serve inference``, fed by a
scheduler process, as ``deep3m up`` runs them); its peak resident set (Linux
``VmHWM``) is read once every block is written. Blocks are read, predicted and
written one at a time, so the peak should not grow with the volume.

Volumes come from the real cdeep3m-mito slices (mirrored in z); the model is a
DeepEM3D 1fm member with random weights, speed level 10, blocks of 8×256×256.

Run: ``python -m bench worker_memory`` or ``python -m bench.bench_worker_memory --help``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import LocalPrediction, build_volume, make_model


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size (VmHWM), or its current RSS elsewhere than Linux."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(psutil.Process(pid).memory_info().rss)


def measure(
    root: Path, slices: int, size: int, width: float, batch: int, block: tuple[int, int, int]
) -> tuple[int, int, float, int]:
    """(peak RSS idle, peak RSS after predicting, seconds, voxels) for one volume size."""
    volume, _ = build_volume(slices, size)
    card, net = make_model(width)
    up = LocalPrediction(root, volume, card, net, batch=batch)
    try:
        idle = peak_rss_bytes(up.worker_pid)
        seconds, _, _ = up.predict(block_shape=block, keep=False)
        peak = peak_rss_bytes(up.worker_pid)
    finally:
        up.close()
    return idle, peak, seconds, volume.size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="inference worker peak memory")
    parser.add_argument("--slices", type=int, default=8, help="z depth of the 1× volume")
    parser.add_argument("--size", type=int, default=512, help="y = x of the 1× volume")
    parser.add_argument("--width", type=float, default=0.0625, help="DeepEM3D width")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv or [])
    block = (8, 256, 256)
    # 4×: twice the size in y and x (the slices stop at 1024², so beyond that, z grows).
    big = (args.slices, args.size * 2) if args.size * 2 <= 1024 else (args.slices * 4, args.size)
    sizes = {"1×": (args.slices, args.size), "4×": big}
    print(
        f"model: DeepEM3D 1fm, width {args.width}, random weights; speed level 10; blocks "
        f"{list(block)}; batch {args.batch}"
    )
    results = {}
    for name, (slices, size) in sizes.items():
        with tempfile.TemporaryDirectory(prefix="deep3m-bench-") as tmp:
            t0 = time.perf_counter()
            results[name] = measure(Path(tmp), slices, size, args.width, args.batch, block)
        idle, peak, seconds, voxels = results[name]
        print(
            f"{name} volume {slices}×{size}×{size} ({voxels / 1e6:.1f} M voxels): worker peak "
            f"RSS {peak / 2**20:.0f} MiB (idle {idle / 2**20:.0f} MiB), predicted in "
            f"{seconds:.1f} s ({time.perf_counter() - t0:.0f} s with start-up)",
            flush=True,
        )
    small, large = results["1×"][1], results["4×"][1]
    print(f"peak RSS ratio 4× / 1×: {large / small:.2f} (1.00 = independent of volume size)")


if __name__ == "__main__":
    main(sys.argv[1:])
