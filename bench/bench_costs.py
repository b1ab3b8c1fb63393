"""Cost per teravoxel of prediction on g5/g6, from measured CPU throughput and FLOP ratios.

What is measured here: the FLOPs per output voxel of each CDeep3M ensemble
member (1fm, 3fm, 5fm) at the published width (torch's FLOP counter over one
forward pass), and the throughput of the full-width 1fm network on this CPU
(whole slices, no I/O), hence the FLOP/s this CPU achieves on it. What is
stated, not measured (no GPU here): each GPU's dense FP16 tensor peak, the
fraction of it a convolutional network reaches (``--gpu-utilisation``), the
pipeline efficiency of deep3m end to end over bare compute (measured on the
CPU by ``python -m bench pipeline``, ``--pipeline-efficiency``), and the
instance prices. A GPU's throughput is then the CPU's scaled by the ratio of
achieved FLOP/s. The printed table is what ``k8s/COSTS.md`` quotes.

Run: ``python -m bench costs`` or ``python -m bench.bench_costs --help``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

MEMBERS = {"1fm": 1, "3fm": 3, "5fm": 5}


@dataclass(frozen=True)
class Instance:
    name: str
    gpu: str
    # Dense FP16/BF16 tensor-core peak of the GPU, TFLOP/s (NVIDIA datasheets).
    peak_tflops: float
    # us-east-1 Linux on-demand, $/h (AWS price list, 2026).
    on_demand: float
    # Typical us-east-1 spot price, $/h (spot price history; it moves daily).
    spot: float


INSTANCES = (
    Instance("g5.xlarge", "A10G", 125.0, 1.006, 0.40),
    Instance("g5.2xlarge", "A10G", 125.0, 1.212, 0.48),
    Instance("g6.xlarge", "L4", 121.0, 0.805, 0.36),
    Instance("g6.2xlarge", "L4", 121.0, 0.978, 0.42),
)


def flops_per_voxel(frames: int, width: float, size: int) -> float:
    from deep3m.models.registry import build_network

    net = build_network("deepem3d", frames=frames, width=width).eval()
    x = torch.zeros(1, frames, size, size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net(x)
    return counter.get_total_flops() / (size * size)


def cpu_voxels_per_second(width: float, size: int, batch: int, rounds: int) -> float:
    from deep3m.models.registry import build_network

    torch.manual_seed(0)
    net = build_network("deepem3d", frames=1, width=width).eval()
    x = torch.randn(batch, 1, size, size)
    times = []
    with torch.inference_mode():
        net(x)  # warm-up: allocator, kernels
        for _ in range(rounds):
            t0 = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t0)
    return batch * size * size / statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="deep3m prediction cost per teravoxel")
    parser.add_argument("--width", type=float, default=1.0, help="DeepEM3D width (1.0)")
    parser.add_argument("--size", type=int, default=256, help="slice size for the CPU run")
    parser.add_argument("--batch", type=int, default=2, help="slices per forward pass")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is used")
    parser.add_argument(
        "--gpu-utilisation", type=float, default=0.25, help="fraction of the GPU peak reached"
    )
    parser.add_argument(
        "--pipeline-efficiency",
        type=float,
        default=0.5,
        help="deep3m end to end / bare compute (python -m bench pipeline)",
    )
    parser.add_argument(
        "--members", default="1fm,3fm,5fm", help="ensemble members predicted per voxel"
    )
    args = parser.parse_args(argv or [])

    members = [m.strip() for m in args.members.split(",") if m.strip()]
    per_member = {m: flops_per_voxel(MEMBERS[m], args.width, 256) for m in members}
    ensemble = sum(per_member.values())
    print(f"DeepEM3D width {args.width}, FLOPs per output voxel (one forward pass):")
    for member, flops in per_member.items():
        print(f"  {member}: {flops / 1e6:.2f} MFLOP")
    print(f"  ensemble ({'+'.join(members)}): {ensemble / 1e6:.2f} MFLOP per voxel")

    rate = cpu_voxels_per_second(args.width, args.size, args.batch, args.rounds)
    cpu_flops = rate * per_member.get("1fm", flops_per_voxel(1, args.width, 256))
    print(
        f"CPU: 1fm at width {args.width}, {args.batch}×{args.size}² per pass, "
        f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs (shared): "
        f"{rate / 1e6:.3f} M voxels/s = {cpu_flops / 1e9:.1f} GFLOP/s achieved"
    )
    print(
        f"assumed: GPU reaches {args.gpu_utilisation:.0%} of its FP16 peak; deep3m end to end "
        f"runs at {args.pipeline_efficiency:.2f} of bare compute; members {'+'.join(members)}"
    )
    header = (
        f"{'instance':<12}{'GPU':<6}{'GPU/CPU':>9}{'Mvox/s':>9}{'h/TV':>8}"
        f"{'$/TV on-demand':>16}{'$/TV spot':>11}"
    )
    print(header)
    for inst in INSTANCES:
        gpu_flops = inst.peak_tflops * 1e12 * args.gpu_utilisation
        ratio = gpu_flops / cpu_flops
        voxels_per_s = gpu_flops / ensemble * args.pipeline_efficiency
        hours = 1e12 / voxels_per_s / 3600
        print(
            f"{inst.name:<12}{inst.gpu:<6}{ratio:>9.0f}{voxels_per_s / 1e6:>9.2f}{hours:>8.1f}"
            f"{hours * inst.on_demand:>16.2f}{hours * inst.spot:>11.2f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
