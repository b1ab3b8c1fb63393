"""Validation accuracy per unit of compute: training recipes beside a plain MONAI U-Net.

``python -m bench accuracy --minutes M`` trains every candidate for the same compute
budget on the cdeep3m-mito training slices (010–029) and scores it on the validation
slices (050–059), all in one run on the same cores:

- the budget is **thread-normalised process CPU time**: ``time.process_time()`` (CPU
  seconds of every thread of this process) divided by the torch thread count. On an
  idle machine that equals wall time; on a machine shared with other work a candidate
  that is slowed down by foreign load gets the same compute, not the same wall time.
  Validation during training counts against the budget. Wall time is reported too.
- candidates run one after another in one process, each with the same threads and a
  fresh seed-0 network; deep3m candidates run through ``train_member`` (the code a
  training job runs, with the clock injected), the peer through a plain loop.
- the peer is MONAI's 2D U-Net with the plain recipe: channels 16, 32, 64, 128, 256,
  2 residual units, Adam 1e-3, Dice + cross-entropy, 8 patches of 256², flips and
  quarter turns, last weights, threshold 0.5.
- metrics come from ``deep3m.postprocess.evaluate`` (what ``deep3m evaluate``
  reports): voxel precision / recall / F1 / Jaccard at exclusion zones 0, 1 and 2 px
  (the zone around each ground-truth border is left out of the count, as in CDeep3M's
  paper) and object F1 (3D connected components matched by centroid), at threshold
  0.5; ``F1@t`` is the voxel F1 at the threshold a deep3m recipe chose on validation
  (the model card's default).

``--candidates a,b`` picks rows (names in ``CANDIDATES``); ``--list`` lists them.
``--data isbi2012-mito`` or ``--data isbi2012-membranes`` runs the same rows, unchanged,
on the ISBI 2012 ssTEM volume (sections 00–19 train, 20–29 validate; membrane, label 0
there, is the foreground).
``--tta`` then scores the last deep3m candidate at each test-time augmentation speed
level (10: identity … 1: all 8 in-plane variations of a 1fm member), with the CPU
seconds each level costs on the 10 validation slices.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deep3m.core.augmentation import (
    SPEED_LEVELS,
    apply_variation,
    invert_variation,
    member_row,
    tta_variations,
)
from deep3m.core.store import Store
from deep3m.postprocess.evaluate import EvaluateSpec, Operand, evaluate_arrays, voxel_counts
from deep3m.training.config import TrainConfig, VolumeSource
from deep3m.training.data import (
    LabelledVolume,
    compute_normalization,
    iteration_rng,
    sample_batch,
    slice_stack,
    to_classes,
)
from deep3m.training.demo_data import load_stack, sample_paths, write_volume
from deep3m.training.evaluate import foreground_probabilities
from deep3m.training.trainer import metrics_key, train_member
from torch import nn

from bench.bench_training import monai_unet

ZONES = (0, 1, 2)
MANY = 10**7  # iterations: the budget ends every run


@dataclass(frozen=True)
class Candidate:
    """A row: a deep3m recipe with overrides, or the plain peer loop (``peer=True``) with
    a network named for :func:`peer_network` (the MONAI U-Net unless a diagnostic row
    swaps it)."""

    name: str
    note: str
    recipe: str = "default"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    peer: bool = False
    peer_network: str = "monai"


def _deepem3d(name: str, width: float, patch: int, extra: str = "") -> Candidate:
    """DeepEM3D 1fm with CDeep3M's solver at the old demo's short-run rate."""
    return Candidate(
        name,
        f"DeepEM3D w{width:g} 1fm, SGD 5e-2 poly, balanced CE, 4×{patch}²{extra}",
        recipe="cdeep3m",
        overrides={"width": width, "patch_shape": (patch, patch), "accumulate_gradients": 1,
                   "learning_rate": 5e-2},
    )  # fmt: skip


_DEFAULT = "unet2d w0.5, AdamW 2e-3 one-cycle, CE+Dice, fg 0.5, 8×256², bf16"
# The previous default (until 2026-12-02): resunet2d w0.5 seeing its input at ×½.
_RESUNET_X2: dict[str, Any] = {
    "architecture": "resunet2d",
    "input_scale": 2,
    "patch_shape": (512, 512),
    "batch_size": 4,
}


def _resunet(name: str, note: str, **changes: Any) -> Candidate:
    """A row relative to the previous default (resunet2d at input scale 2)."""
    return Candidate(name, note, overrides={**_RESUNET_X2, **changes})


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("monai", "MONAI UNet 16…256, 2 res units, Adam 1e-3, DiceCE, 8×256²", peer=True),
    # Diagnostics: the peer's plain loop with another network, to tell the network's
    # share of the gap from the training loop's.
    Candidate(
        "peer-bn",
        "the peer with BatchNorm instead of instance norm",
        peer=True,
        peer_network="monai-bn",
    ),
    Candidate(
        "peer-resunet",
        "the peer's loop training deep3m's resunet2d w0.5 (BatchNorm)",
        peer=True,
        peer_network="resunet2d",
    ),
    _deepem3d("cdeep3m-demo", 0.125, 128, " (the old demo)"),
    _deepem3d("deepem3d-w0.25", 0.25, 256),
    Candidate("default", _DEFAULT),
    Candidate(
        "unet2d-512",
        "default with 4×512² patches (4× the field of view, 2× the pixels)",
        overrides={"patch_shape": (512, 512), "batch_size": 4},
    ),
    _resunet(
        "resunet2d-x2",
        "the previous default: resunet2d w0.5 at input scale 2 (×½), 4×512² (256² seen)",
    ),
    _resunet(
        "x1-256",
        "resunet2d-x2 at full resolution, 4×256²",
        input_scale=1,
        patch_shape=(256, 256),
    ),
    _resunet(
        "x4-1024",
        "resunet2d-x2 at 1/4 resolution, 4×1024²",
        input_scale=4,
        patch_shape=(1024, 1024),
    ),
    _resunet("x2-256", "resunet2d-x2 with 4×256² patches (128² seen)", patch_shape=(256, 256)),
    _resunet("x2-b8", "resunet2d-x2 with batch 8", batch_size=8),
    _resunet(
        "lean",
        "resunet2d-x2 at full resolution, 8×256² uniform, unweighted CE+Dice, AdamW 1e-3",
        input_scale=1,
        patch_shape=(256, 256),
        batch_size=8,
        foreground_fraction=0.0,
        class_balance=False,
        learning_rate=1e-3,
    ),
    Candidate("ce", "default with balanced CE only", overrides={"loss": "ce"}),
    Candidate("unbalanced", "default without class weights", overrides={"class_balance": False}),
    Candidate("uniform", "default with uniform patches", overrides={"foreground_fraction": 0.0}),
    Candidate(
        "sgd-poly",
        "default with SGD 5e-2 poly (CDeep3M's solver)",
        overrides={
            "optimizer": "sgd",
            "learning_rate": 5e-2,
            "schedule": "poly",
            "weight_decay": 5e-4,
        },
    ),
    Candidate("cosine", "default with cosine decay", overrides={"schedule": "cosine"}),
    Candidate("lr1e-3", "default at AdamW 1e-3", overrides={"learning_rate": 1e-3}),
    Candidate("lr4e-3", "default at AdamW 4e-3", overrides={"learning_rate": 4e-3}),
    Candidate(
        "fp32",
        "default in float32, contiguous",
        overrides={"cpu_bfloat16": False, "channels_last": False},
    ),
    Candidate(
        "intensity",
        "default + contrast/blur/noise",
        overrides={"intensity_augmentations": ("contrast", "blur", "noise")},
    ),
    Candidate("w1.0", "default at width 1.0 (32…512)", overrides={"width": 1.0}),
    Candidate("w0.25", "default at width 0.25 (8…128)", overrides={"width": 0.25}),
    Candidate("3fm", "default as a 3fm member", overrides={"members": ("3fm",)}),
    Candidate(
        "deepem3d-x2",
        "DeepEM3D w0.25 with the default recipe at input scale 2, 4×512²",
        overrides={**_RESUNET_X2, "architecture": "deepem3d", "width": 0.25},
    ),
)
SCREEN = (
    "monai",
    "cdeep3m-demo",
    "default",
    "unet2d-512",
    "resunet2d-x2",
    "ce",
    "sgd-poly",
    "fp32",
)


@dataclass(frozen=True)
class Data:
    train: LabelledVolume
    val: LabelledVolume
    store: Store
    paths: Mapping[str, str]
    description: str


ISBI = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "isbi2012" / "train"
# Each data set: (description, training / validation split, label → foreground rule).
DATASETS = ("cdeep3m-mito", "isbi2012-mito", "isbi2012-membranes")


def _stacks(dataset: str) -> tuple[dict[str, np.ndarray], str]:
    """Images and 0/1 labels of the training and validation slices of ``dataset``."""
    if dataset == "cdeep3m-mito":
        data = sample_paths()
        stacks = {
            "images": load_stack(data.train_images),
            "labels": load_stack(data.train_labels),
            "validation_images": load_stack(data.val_images),
            "validation_labels": load_stack(data.val_labels),
        }
        return stacks, data.description
    if dataset not in DATASETS:
        raise SystemExit(f"unknown data set {dataset!r}; choose from {list(DATASETS)}")
    images = load_stack(ISBI / "images")
    if dataset == "isbi2012-mito":
        labels = (load_stack(ISBI / "mitochondria") > 0).astype(np.uint8)
    else:  # ISBI membranes: 0 is membrane, 255 cell interior; membrane is the foreground
        labels = (load_stack(ISBI / "membranes") == 0).astype(np.uint8)
    stacks = {"images": images[:20], "labels": labels[:20],
              "validation_images": images[20:], "validation_labels": labels[20:]}  # fmt: skip
    what = "mitochondria" if dataset == "isbi2012-mito" else "membranes"
    return stacks, f"ISBI 2012 ssTEM {what} ({ISBI}): sections 00–19 train, 20–29 validate"


def load_data(root: Path, dataset: str = "cdeep3m-mito") -> Data:
    stacks, description = _stacks(dataset)
    store = Store(str(root / "store"))
    paths = {k: write_volume(store, f"volumes/{k}.zarr", v) for k, v in stacks.items()}
    norm = compute_normalization(stacks["images"])
    train = LabelledVolume(
        norm.apply(stacks["images"]), to_classes(stacks["labels"], 2, where="labels"), "train"
    )
    val = LabelledVolume(
        norm.apply(stacks["validation_images"]),
        to_classes(stacks["validation_labels"], 2, where="validation_labels"),
        "validation",
    )
    return Data(train, val, store, paths, description)


class CpuClock:
    """Thread-normalised CPU seconds of this process (see the module docstring)."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)

    def __call__(self) -> float:
        return time.process_time() / self.threads


def peer_network(name: str) -> nn.Module:
    """A network for the peer loop: ``monai`` (instance norm), ``monai-bn``, ``resunet2d``."""
    if name == "monai":
        return monai_unet()
    if name == "monai-bn":
        return monai_unet(norm="batch")
    if name == "resunet2d":
        from deep3m.models.registry import build_network

        return build_network("resunet2d", frames=1, width=0.5, input_scale=1)
    raise ValueError(f"unknown peer network {name!r}")


def train_peer(
    data: Data, budget_s: float, clock: Callable[[], float], network: str = "monai"
) -> tuple[nn.Module, int]:
    """The plain recipe: Adam 1e-3, DiceCE, 8×256², flips/rot90, last weights."""
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    net = peer_network(network)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    started = clock()
    it = 0
    while clock() - started < budget_s:
        # One frame: the 16 variations are the 8 flips/quarter turns (z flips are no-ops).
        x, y = sample_batch(data.train, iteration_rng(0, 0, it), batch=8, frames=1,
                            patch=(256, 256))  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y)[:, None])
        loss.backward()
        opt.step()
        it += 1
    return net.eval(), it


def train_deep3m(
    data: Data, candidate: Candidate, budget_s: float, clock: Callable[[], float], index: int
) -> tuple[nn.Module, int, int, float]:
    """(network, frames, iterations, threshold chosen on validation)."""
    values: dict[str, Any] = {
        "model_id": f"bench-{index}",
        "recipe": candidate.recipe,
        "images": VolumeSource(path=data.paths["images"]),
        "labels": VolumeSource(path=data.paths["labels"]),
        "validation_images": VolumeSource(path=data.paths["validation_images"]),
        "validation_labels": VolumeSource(path=data.paths["validation_labels"]),
        "members": ("1fm",),
        "iterations": MANY,
        "max_minutes": budget_s / 60.0,
        "snapshot_every": MANY,
        "log_every": 50,
        "seed": 0,
    }
    values.update(candidate.overrides)
    # Validate about five times over the budget, at the rate seen after a warm-up.
    values.setdefault("validate_every", MANY)
    config = TrainConfig.create(**values)
    if config.keep_best and config.validate_every == MANY:
        config = config.model_copy(update={"validate_every": _validate_every(config, budget_s)})
    member = config.members[0]
    result = train_member(config, member, data.store, device="cpu", clock=clock, resume=False)
    from deep3m.models.registry import build_network

    net = build_network(
        config.architecture,
        frames=config.frames(member),
        width=config.width,
        input_scale=config.input_scale,
    )
    net.load_state_dict(dict(result.state_dict), strict=True)
    doc = data.store.read_json(metrics_key(config.model_id, member))
    return net.eval(), config.frames(member), result.iterations, float(doc.get("threshold", 0.5))


def _validate_every(config: TrainConfig, budget_s: float) -> int:
    """Iterations between validations so that a run validates about five times."""
    from deep3m.models.registry import build_network

    net = build_network(
        config.architecture, frames=1, width=config.width, input_scale=config.input_scale
    )
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x = torch.randn(config.batch_size, 1, *config.patch_shape)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.cpu_bfloat16):
            out = net(x)
        out.float().mean().backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    per_step = min(times)
    return max(20, int(budget_s / 5 / per_step * 0.8))


def score(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Voxel metrics at each exclusion zone and object F1 (deep3m.postprocess.evaluate)."""
    pred = Operand(probs, "probability")
    gt = Operand(labels.astype(np.uint8), "labels")
    out: dict[str, float] = {}
    for zone in ZONES:
        counts = voxel_counts(pred, gt, threshold=threshold, exclusion_zone=zone)
        out.update({f"{k}@{zone}": v for k, v in
                    (("precision", counts.precision), ("recall", counts.recall),
                     ("f1", counts.f1), ("jaccard", counts.jaccard))})  # fmt: skip
    objects = evaluate_arrays(pred, gt, EvaluateSpec(threshold=threshold, objects=True)).objects
    out["object_f1"] = objects.f1 if objects is not None else 0.0
    return out


HEADER = (
    ("candidate", 14), ("P@0", 5), ("R@0", 5), ("F1@0", 5), ("J@0", 5), ("F1@1", 5),
    ("F1@2", 5), ("objF1", 5), ("F1@t", 9), ("iters", 6), ("cpu s", 5), ("wall s", 6),
)  # fmt: skip


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, (_, w) in zip(cells, HEADER, strict=True)) + " |"


def batch_statistics_f1(net: nn.Module, frames: int, data: Data) -> float:
    """F1@0 with every BatchNorm layer normalising by each slice pair's own statistics
    (train mode, running statistics untouched): a diagnostic of train/eval mismatch."""
    from deep3m.training.evaluate import predict_slices

    probe = copy.deepcopy(net).eval()
    for module in probe.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
            module.momentum = 0.0
    depth = data.val.shape[0]
    probs = np.zeros(data.val.labels.shape, np.float32)
    for start in range(0, depth, 2):
        zs = range(start, min(start + 2, depth))
        out = predict_slices(probe, data.val.images, frames, torch.device("cpu"), zs)
        probs[zs.start : zs.stop] = 1.0 - out[:, 0]
    return score(probs, data.val.labels > 0)["f1@0"]


def tta_probabilities(
    net: nn.Module, volume: LabelledVolume, frames: int, level: int
) -> np.ndarray:
    """P(foreground) averaged over the speed level's variations, each inverted back."""
    variations = tta_variations(level, member_row(frames))
    out = np.zeros(volume.labels.shape, np.float32)
    with torch.no_grad():
        for z in range(volume.shape[0]):
            stack = slice_stack(volume.images, z, frames)
            for v in variations:
                x = np.ascontiguousarray(apply_variation(stack, v, has_z=True))[None]
                probs = torch.softmax(net(torch.from_numpy(x)).float(), dim=1)[0, 1].numpy()
                out[z] += invert_variation(probs, v, has_z=False)
    return out / np.float32(len(variations))


def tta_table(net: nn.Module, frames: int, threshold: float, data: Data) -> None:
    clock = CpuClock(torch.get_num_threads())
    print(f"\nTest-time augmentation speed levels (threshold {threshold:.2f})")
    print("| level | variations | F1@0 | F1@1 | objF1 | cpu s |")
    print("|---|---|---|---|---|---|")
    for level in sorted(SPEED_LEVELS, reverse=True):
        t0 = clock()
        probs = tta_probabilities(net, data.val, frames, level)
        seconds = clock() - t0
        m = score(probs, data.val.labels > 0, threshold)
        n = len(tta_variations(level, member_row(frames)))
        print(f"| {level} | {n} | {m['f1@0']:.3f} | {m['f1@1']:.3f} | {m['object_f1']:.3f} "
              f"| {seconds:.0f} |", flush=True)  # fmt: skip


def run(
    names: Sequence[str],
    minutes: float,
    threads: int,
    *,
    tta: bool = False,
    dataset: str = "cdeep3m-mito",
    batch_stats: bool = False,
) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    clock = CpuClock(threads)
    budget = minutes * 60.0
    chosen = [c for c in CANDIDATES if c.name in names]
    rows: list[dict[str, Any]] = []
    last: tuple[nn.Module, int, float] | None = None
    with tempfile.TemporaryDirectory(prefix="deep3m-bench-acc-") as tmp:
        data = load_data(Path(tmp), dataset)
        print(f"data: {data.description}")
        print(
            f"budget {minutes:g} min of thread-normalised CPU time per candidate, "
            f"{threads} torch threads, validation {data.val.shape[0]} slices of "
            f"{data.val.shape[1]}×{data.val.shape[2]}; F1@t: F1 at the threshold chosen "
            "on validation"
        )
        print(_line([h for h, _ in HEADER]))
        print("|" + "|".join("-" * (w + 2) for _, w in HEADER) + "|", flush=True)
        for i, cand in enumerate(chosen):
            wall0, cpu0 = time.monotonic(), clock()
            if cand.peer:
                net, its = train_peer(data, budget, clock, cand.peer_network)
                frames, threshold = 1, 0.5
            else:
                net, frames, its, threshold = train_deep3m(data, cand, budget, clock, i)
            cpu_s, wall_s = clock() - cpu0, time.monotonic() - wall0
            with torch.no_grad():
                probs = foreground_probabilities([(net, frames, 1.0)], data.val,
                                                 torch.device("cpu"))  # fmt: skip
            m = score(probs, data.val.labels > 0)
            at_t = score(probs, data.val.labels > 0, threshold)["f1@0"]
            row = {"name": cand.name, "note": cand.note, **m, "f1@t": at_t,
                   "threshold": threshold, "iterations": its, "cpu_s": cpu_s,
                   "wall_s": wall_s}  # fmt: skip
            rows.append(row)
            if not cand.peer:
                last = (net, frames, threshold)
            if batch_stats and not cand.peer:
                row["f1@0_batch_stats"] = batch_statistics_f1(net, frames, data)
            print(
                _line([
                    cand.name, *(f"{m[k]:.3f}" for k in ("precision@0", "recall@0", "f1@0",
                    "jaccard@0", "f1@1", "f1@2", "object_f1")),
                    f"{at_t:.3f}@{threshold:.2f}", str(its), f"{cpu_s:.0f}", f"{wall_s:.0f}",
                ]),
                flush=True,
            )  # fmt: skip
        if tta and last is not None:
            tta_table(*last, data)
    peer = next((r for r in rows if r["name"] == "monai"), None)
    print()
    for r in rows:
        if "f1@0_batch_stats" in r:
            print(f"{r['name']}: F1@0 {r['f1@0']:.3f} with BatchNorm running statistics, "
                  f"{r['f1@0_batch_stats']:.3f} with each slice pair's own")  # fmt: skip
    for r in rows:
        gap = f", F1@0 − MONAI {r['f1@0'] - peer['f1@0']:+.3f}" if peer and r is not peer else ""
        print(f"{r['name']}: {r['note']}{gap}")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench accuracy")
    parser.add_argument(
        "--minutes",
        type=float,
        default=float(os.environ.get("DEEP3M_BENCH_ACCURACY_MINUTES", "3")),
        help="compute budget per candidate (thread-normalised CPU minutes)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--candidates",
        default=",".join(("monai", "cdeep3m-demo", "default")),
        help=f"comma-separated rows (screening set: {','.join(SCREEN)})",
    )
    parser.add_argument(
        "--data",
        choices=DATASETS,
        default="cdeep3m-mito",
        help="training / validation data (isbi2012: sections 00–19 train, 20–29 validate)",
    )
    parser.add_argument(
        "--batch-stats",
        action="store_true",
        help="also score deep3m rows with BatchNorm using each slice pair's statistics",
    )
    parser.add_argument("--list", action="store_true", help="list the candidates and exit")
    parser.add_argument(
        "--tta", action="store_true", help="score the last deep3m candidate at each TTA level"
    )
    args = parser.parse_args(list(argv) if argv is not None else [])
    if args.list:
        for c in CANDIDATES:
            print(f"{c.name:16} {c.note}")
        return
    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    unknown = sorted(set(names) - {c.name for c in CANDIDATES})
    if unknown:
        raise SystemExit(f"unknown candidate(s) {unknown}; see --list")
    run(
        names,
        args.minutes,
        args.threads,
        tta=args.tta,
        dataset=args.data,
        batch_stats=args.batch_stats,
    )


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
