"""Pipeline efficiency of prediction: deep3m end to end vs. the model alone and MONAI.

Ways to predict the same volume with the same network, measured side by side in
rounds (medians reported; the order rotates each round so no row always follows
another):

(a) the model alone, same output: deep3m's blocks (default block shape, the
    card's halo mirror-padded at the volume border, the same member, speed level
    and batch) computed one after another in this process, their inputs already
    in memory: the compute phase of (d), timed around the predictor only. This is
    the baseline of the pipeline's efficiency: everything (b) spends beyond it is
    reading, writing, scheduling or idle cores;
(a') the model alone over bare whole slices (no halo, no I/O): what the halo costs
    is (a) − (a');
(b) deep3m end to end: the input in a local zarr store, a predict job submitted
    to a scheduler process, blocks predicted by an inference worker process
    (``deep3m serve``, with the compute settings ``deep3m up`` gives it) and written
    to zarr; timed from submit until the predict stage has written every block.
    The worker pipelines: while one block computes, the next is read and the
    previous one written;
(c) ``monai.inferers.sliding_window_inference`` (overlap 0.25, gaussian
    blending) over whole slices, roi = the deep3m block's y/x shape;
(d) deep3m's blocks one after another in this process, no overlap, each phase
    timed: read (zarr, halo mirror-padded), compute (the predictor over the read
    box), write (zarr, the store's codecs).

Comparable rows: this process computes on every core (``torch.set_num_threads``
= the CPU count, as many threads as the worker's threads × blocks at once), and
every in-process shape is run once before the rounds (the first pass of a shape
pays oneDNN's kernel set-up and first-touch allocation; the warm-up prints both
passes), and one untimed run of (b) precedes the rounds (the worker loads the
model and warms its own shapes; its time is printed). The load average is printed per round:
the machine may be shared, and only same-round ratios mean much then.

The volume is built from the real CDeep3M mitochondria slices in
``../shared/data/cdeep3m-mito`` (training + validation: 30 slices of 1024²),
mirrored in z to the requested depth. The network is a DeepEM3D 1fm member with
random weights (throughput does not depend on the weights), at speed level 10
(identity; the other levels multiply every method's work alike).

Run: ``python -m bench pipeline`` (24×1024², 3 rounds) or
``python -m bench.bench_pipeline --help``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.common import MEMBER, LocalPrediction, build_volume, make_model

PHASES = ("read", "compute", "write")


def pure_compute(
    card: Any, net: nn.Module, volume: np.ndarray, batch: int
) -> tuple[float, np.ndarray]:
    from deep3m.inference.predictor import foreground_probability

    x = torch.from_numpy(card.normalize(volume))
    out = torch.empty(x.shape, dtype=torch.float32)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for z in range(0, x.shape[0], batch):
            out[z : z + batch] = foreground_probability(net(x[z : z + batch, None]))
    return time.perf_counter() - t0, out.numpy()


def warm_up(net: nn.Module, shapes: list[tuple[int, ...]]) -> list[tuple[float, float]]:
    """Two passes of each input shape, timed: the first pays kernel set-up and first-touch
    allocation, which no timed row should (every row runs many passes of these shapes)."""
    spent = []
    with torch.inference_mode():
        for shape in shapes:
            x = torch.zeros(shape)
            passes = []
            for _ in range(2):
                t0 = time.perf_counter()
                net(x)
                passes.append(time.perf_counter() - t0)
            spent.append((passes[0], passes[1]))
    return spent


def thread_layouts(net: nn.Module, shape: tuple[int, ...], cpus: int, passes: int) -> str:
    """Two CPU layouts of the worker on the block shape: every core on one stream of
    passes (``--worker-threads`` = cores), or one thread per stream and ``cpus``
    streams (``deep3m up``'s default on 2 cores): steady-state throughput, no tail."""
    import threading

    x = torch.zeros(shape)

    def stream(n: int) -> None:
        with torch.inference_mode():
            for _ in range(n):
                net(x)

    def timed(threads: int, streams: int) -> float:
        torch.set_num_threads(threads)
        workers = [threading.Thread(target=stream, args=(passes,)) for _ in range(streams)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return (time.perf_counter() - t0) / (passes * streams)

    try:
        one = [timed(cpus, 1), timed(1, cpus), timed(cpus, 1), timed(1, cpus)]
    finally:
        torch.set_num_threads(cpus)
    together, apart = min(one[0], one[2]), min(one[1], one[3])
    return (
        f"thread layouts on {list(shape)}, best of 2: {cpus} threads x 1 stream "
        f"{together:.2f} s per pass, 1 thread x {cpus} streams {apart:.2f} s per pass "
        f"(side by side ÷ together {apart / together:.2f}; below 1: blocks side by side "
        "give more throughput)"
    )


def load() -> str:
    return "load " + "/".join(f"{v:.1f}" for v in os.getloadavg())


def blockwise_serial(
    card: Any, net: nn.Module, volume: np.ndarray, batch: int, block: tuple[int, ...], root: Path
) -> dict[str, float]:
    """deep3m's blocks one after another here, no overlap: seconds per phase, summed, and
    the fraction of the computed pixels that are halo (``halo_fraction``)."""
    from deep3m.core.geometry import plan_blocks, read_padded
    from deep3m.core.store import Store
    from deep3m.inference.predictor import EnsemblePredictor

    store = Store(str(root / "serial"))
    source = store.create_volume("in.zarr", volume.shape, "uint8", overwrite=True)
    source[...] = volume
    target = store.create_volume(
        "out.zarr", volume.shape, "float32", chunk_shape=block, overwrite=True
    )
    predictor = EnsemblePredictor(card, {MEMBER: net}, tta_level=10, batch_size=batch)
    seconds = dict.fromkeys(PHASES, 0.0)
    core_px = computed_px = 0
    m = card.input_multiple
    for b in plan_blocks(volume.shape, block, card.halo):
        box = predictor.read_box(b)
        # Pixels the network sees per output slice (y/x padded to the input multiple)
        # against the core's: the share of compute spent on the halo.
        core_px += b.core.size
        computed_px += b.core.shape[0] * prod(-(-n // m) * m for n in box.shape[1:])
        t0 = time.perf_counter()
        raw = read_padded(source, box)
        t1 = time.perf_counter()
        pred = predictor.predict_core(raw, b.core, box)
        t2 = time.perf_counter()
        target[b.core.slices()] = pred
        t3 = time.perf_counter()
        for phase, spent in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            seconds[phase] += spent
    store.delete("in.zarr")
    store.delete("out.zarr")
    seconds["halo_fraction"] = 1.0 - core_px / computed_px
    return seconds


def monai_sliding(
    card: Any, net: nn.Module, volume: np.ndarray, batch: int, roi: tuple[int, int]
) -> float:
    from deep3m.inference.predictor import foreground_probability
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(card.normalize(volume))
    out = torch.empty(x.shape, dtype=torch.float32)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for z in range(0, x.shape[0], batch):
            logits = sliding_window_inference(
                x[z : z + batch, None],
                roi_size=roi,
                sw_batch_size=batch,
                predictor=net,
                overlap=0.25,
                mode="gaussian",
            )
            out[z : z + batch] = foreground_probability(logits)  # type: ignore[arg-type]
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="deep3m prediction pipeline efficiency")
    parser.add_argument("--slices", type=int, default=24, help="z depth (default 24)")
    parser.add_argument("--size", type=int, default=1024, help="y = x size (default 1024)")
    parser.add_argument("--width", type=float, default=0.0625, help="DeepEM3D width")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--batch", type=int, default=4, help="slices per forward pass")
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=0,
        help="torch threads of the inference worker, which then computes cores ÷ threads "
        "blocks at once (default: as deep3m up starts it)",
    )
    parser.add_argument("--no-monai", action="store_true", help="skip row (c)")
    args = parser.parse_args(argv or [])

    cpus = os.cpu_count() or 1
    # Every row computes on the whole machine: this process on every core, the worker
    # on threads × blocks at once = every core.
    torch.set_num_threads(cpus)
    volume, note = build_volume(args.slices, args.size)
    card, net = make_model(args.width)
    voxels = volume.size
    print(f"volume: {note}; {voxels / 1e6:.1f} M voxels")
    print(
        f"model: DeepEM3D {MEMBER}, width {args.width}, random weights; speed level 10; "
        f"batch {args.batch}; this process: {torch.get_num_threads()} torch threads; "
        f"{cpus} CPUs; {load()} at the start"
    )
    names = ["deep3m", "same", "bare", "serial"] + ([] if args.no_monai else ["monai"])
    times: dict[str, list[float]] = {n: [] for n in names}
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    loads: list[float] = []
    halo = [0.0]
    outputs: dict[str, np.ndarray | None] = {"bare": None, "deep3m": None}
    block: tuple[int, ...] = ()
    with tempfile.TemporaryDirectory(prefix="deep3m-bench-") as tmp:
        worker_env = {}
        if args.worker_threads:
            worker_env = {
                "DEEP3M_TORCH_THREADS": str(args.worker_threads),
                "DEEP3M_WORKER_CAPACITY": str(max(1, cpus // args.worker_threads)),
            }
        up = LocalPrediction(Path(tmp), volume, card, net, batch=args.batch, env=worker_env)
        print(f"deep3m worker: {up.worker_config()}")
        try:
            # The block shape is the scheduler's choice: the first run tells it.
            first_s, outputs["deep3m"], block = up.predict()
            m = card.input_multiple
            boxed = [
                -(-(n + 2 * h) // m) * m for n, h in zip(block[1:], card.halo[1:], strict=True)
            ]
            shapes = [(args.batch, 1, args.size, args.size), (args.batch, 1, *boxed)]
            warm = warm_up(net, shapes)
            print(
                f"warm-up (untimed run of (b): {first_s:.1f} s; in this process, per shape, "
                "first pass / second pass): "
                + ", ".join(
                    f"{list(sh[2:])} {a:.2f} / {b:.2f} s"
                    for sh, (a, b) in zip(shapes, warm, strict=True)
                ),
                flush=True,
            )

            def run_deep3m() -> float:
                seconds, outputs["deep3m"], _ = up.predict()
                return seconds

            def run_bare() -> float:
                seconds, outputs["bare"] = pure_compute(card, net, volume, args.batch)
                return seconds

            def run_serial() -> float:
                spent = blockwise_serial(card, net, volume, args.batch, block, Path(tmp))
                halo[0] = spent["halo_fraction"]
                for phase in PHASES:
                    phases[phase].append(spent[phase])
                times["same"].append(spent["compute"])
                return sum(spent[p] for p in PHASES)

            def run_monai() -> float:
                return monai_sliding(card, net, volume, args.batch, (block[1], block[2]))

            runs: list[tuple[str, Callable[[], float]]] = [
                ("deep3m", run_deep3m),
                ("bare", run_bare),
                ("serial", run_serial),
            ]
            if not args.no_monai:
                runs.append(("monai", run_monai))
            for r in range(args.rounds):
                order = runs[r % len(runs) :] + runs[: r % len(runs)]
                for name, fn in order:
                    times[name].append(fn())
                loads.append(os.getloadavg()[0])
                print(
                    f"round {r + 1} ({load()}): "
                    + ", ".join(f"{n} {times[n][-1]:.1f} s" for n, _ in order)
                    + " (serial: "
                    + ", ".join(f"{p} {phases[p][-1]:.1f} s" for p in PHASES)
                    + f"); (b) vs (a) this round {times['same'][-1] / times['deep3m'][-1]:.3f}",
                    flush=True,
                )
        finally:
            up.close()
    report(args, card, block, voxels, times, phases, halo[0], loads)
    check_outputs(outputs["bare"], outputs["deep3m"])
    print(thread_layouts(net, shapes[1], cpus, passes=2), f"({load()})")


def report(
    args: argparse.Namespace,
    card: Any,
    block: tuple[int, ...],
    voxels: int,
    times: dict[str, list[float]],
    phases: dict[str, list[float]],
    halo: float,
    loads: list[float],
) -> None:
    median = {n: statistics.median(t) for n, t in times.items()}
    rate = {n: voxels / m for n, m in median.items()}
    print(
        f"\ndeep3m block shape {list(block)} (planner default), halo {list(card.halo)} "
        f"(card default); MONAI roi {list(block[1:])}; 1-minute load average over the "
        f"rounds {min(loads):.1f}–{max(loads):.1f}"
    )
    labels = {
        "same": "(a)  model alone, same output (blocks + halo, no I/O)",
        "bare": "(a') model alone, bare whole slices (no halo, no I/O)",
        "deep3m": "(b)  deep3m end to end (scheduler + worker)",
        "monai": "(c)  MONAI sliding window (0.25, gaussian)",
        "serial": "(d)  deep3m blocks in series, here (no overlap)",
    }
    print(f"{'method':<56}{'median s':>10}{'M voxels/s':>12}")
    for n in labels:
        if n in median:
            print(f"{labels[n]:<56}{median[n]:>10.2f}{rate[n] / 1e6:>12.3f}")
    print(
        f"pipeline efficiency, (b) vs the same output computed alone (a): "
        f"{rate['deep3m'] / rate['same']:.3f}"
    )
    same_round = [a / b for a, b in zip(times["same"], times["deep3m"], strict=True)]
    print(
        f"  per round {', '.join(f'{r:.3f}' for r in same_round)} (median "
        f"{statistics.median(same_round):.3f}); best times: "
        f"{min(times['same']) / min(times['deep3m']):.3f}"
    )
    print(
        f"(b) vs bare whole-slice compute (a'), the halo's cost included: "
        f"{rate['deep3m'] / rate['bare']:.3f}"
    )
    print(
        f"halo: (a') ÷ (a) = {median['bare'] / median['same']:.3f} measured; core ÷ computed "
        f"pixels = {1 - halo:.3f}"
    )
    if "monai" in rate:
        print(f"deep3m vs MONAI, (b) ÷ (c): {rate['deep3m'] / rate['monai']:.3f}")
    cost = {p: statistics.median(v) for p, v in phases.items()}
    compute, e2e = median["same"], median["deep3m"]
    # The halo's share of compute follows from pixel counts (convolutions cost per
    # pixel), so it does not depend on how loaded the machine was between runs.
    breakdown = [
        ("compute, the cores ((a) x core pixels)", compute * (1 - halo)),
        ("compute, the halo recomputed ((a) x halo pixels)", compute * halo),
        ("scheduling, idle, I/O not hidden ((b) - (a))", e2e - compute),
    ]
    print(f"\ncost breakdown of (b), medians over {args.rounds} round(s):")
    print(f"{'part':<60}{'s':>8}{'share of (b)':>14}")
    for name, spent in breakdown:
        print(f"{name:<60}{spent:>8.2f}{spent / e2e:>14.1%}")
    print("measured in series in (d), overlapped with compute in (b):")
    for phase in ("read", "write"):
        print(f"{'  ' + phase:<60}{cost[phase]:>8.2f}{cost[phase] / e2e:>14.1%}")


def check_outputs(bare: np.ndarray | None, blockwise: np.ndarray | None) -> None:
    if blockwise is not None and (unwritten := int((blockwise == 0).sum())):
        print(f"WARNING: {unwritten} output voxels still hold the fill value 0 (unwritten?)")
    if bare is not None and blockwise is not None and min(bare.shape[1:]) > 128:
        inner = (slice(None), slice(64, -64), slice(64, -64))
        diff = np.abs(bare[inner] - blockwise[inner])
        print(
            f"blockwise vs whole-slice probabilities away from the volume border: max |diff| "
            f"{diff.max():.3g}, mean {diff.mean():.3g} (nonzero where the network's receptive "
            "field reaches past the halo)"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
