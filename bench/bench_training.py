"""Training throughput and accuracy-per-CPU-minute, beside MONAI's standard 2D UNet.

1. Throughput: training samples per second (forward, class-weighted loss,
   backward, optimiser step) of each DeepEM3D member (1fm/3fm/5fm) at several
   widths, and of ``monai.networks.nets.UNet`` (2D, channels 16…256, 2 residual
   units) as the baseline, all on 128² patches, batch 4, on the CPU. Medians of
   timed iterations after warm-up.
2. Accuracy after a fixed CPU budget: the DeepEM3D ensemble (1fm+3fm+5fm sharing
   the budget equally, probabilities averaged) and the MONAI UNet, each trained
   for the same wall-clock budget on the cdeep3m-mito training slices with the
   same sampler (16 CDeep3M variations), loss (class-weighted cross-entropy),
   optimiser and poly schedule, then scored on the 10 validation slices
   (voxel precision, recall, F1, Jaccard at probability 0.5).

``python -m bench training`` uses a 2-minute budget per model; set
``DEEP3M_BENCH_TRAIN_MINUTES=20`` (or run this module with ``--minutes 20``)
for the long comparison. Data: ``../shared/data/cdeep3m-mito`` when present,
else the packaged crop (noted in the output).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from deep3m.models.registry import build_network, parameter_count
from deep3m.training.config import TrainConfig, VolumeSource
from deep3m.training.data import (
    LabelledVolume,
    class_weights,
    compute_normalization,
    iteration_rng,
    sample_batch,
    to_classes,
)
from deep3m.training.demo_data import DEMO_RECIPE, load_stack, sample_paths
from deep3m.training.evaluate import evaluate_ensemble
from deep3m.training.trainer import make_optimizer, member_loss
from torch import nn

PATCH = (128, 128)
BATCH = 4
WIDTHS = (0.0625, 0.125, 0.25)
MEMBERS = {"1fm": 1, "3fm": 3, "5fm": 5}


def monai_unet() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
    )


def _config(learning_rate: float, iterations: int, optimizer: str) -> TrainConfig:
    src = VolumeSource(path="bench")
    return TrainConfig.create(
        model_id="bench",
        images=src,
        labels=src,
        iterations=iterations,
        learning_rate=learning_rate,
        optimizer=optimizer,
        patch_shape=PATCH,
        batch_size=BATCH,
        accumulate_gradients=1,
    )


def _step(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    volume: LabelledVolume,
    frames: int,
    weights: torch.Tensor,
    it: int,
) -> float:
    x, y = sample_batch(volume, iteration_rng(0, 0, it), batch=BATCH, frames=frames, patch=PATCH)
    opt.zero_grad(set_to_none=True)
    loss = member_loss(net(torch.from_numpy(x)), torch.from_numpy(y), weights)
    loss.backward()
    opt.step()
    return float(loss.item())


def samples_per_second(
    make: Callable[[], nn.Module],
    frames: int,
    volume: LabelledVolume,
    weights: torch.Tensor,
    *,
    warmup: int = 3,
    timed: int = 8,
) -> float:
    torch.manual_seed(0)
    net = make()
    opt = make_optimizer(_config(1e-2, 1000, "sgd"), net)
    for it in range(warmup):
        _step(net, opt, volume, frames, weights, it)
    times = []
    for it in range(warmup, warmup + timed):
        started = time.perf_counter()
        _step(net, opt, volume, frames, weights, it)
        times.append(time.perf_counter() - started)
    return BATCH / statistics.median(times)


def train_for(
    make: Callable[[], nn.Module],
    frames: int,
    volume: LabelledVolume,
    weights: torch.Tensor,
    budget_s: float,
    *,
    learning_rate: float,
    optimizer: str,
) -> tuple[nn.Module, int]:
    """Train for ``budget_s`` of wall-clock time after one untimed warm-up iteration;
    the poly schedule runs on elapsed time (1 − t/budget)^0.8, so both models get a
    full decay whatever their speed."""
    torch.manual_seed(0)
    net = make()
    config = _config(learning_rate, 10**6, optimizer)
    opt = make_optimizer(config, net)
    _step(net, opt, volume, frames, weights, 0)  # warm-up (kernel selection), not timed
    started = time.perf_counter()
    it = 1
    while (elapsed := time.perf_counter() - started) < budget_s:
        for group in opt.param_groups:
            group["lr"] = config.base_learning_rate * (1.0 - elapsed / budget_s) ** config.lr_power
        _step(net, opt, volume, frames, weights, it)
        it += 1
    return net.eval(), it


def _volumes() -> tuple[LabelledVolume, LabelledVolume, np.ndarray, str]:
    data = sample_paths()
    raw = load_stack(data.train_images)
    norm = compute_normalization(raw)
    train = LabelledVolume(
        norm.apply(raw), to_classes(load_stack(data.train_labels), 2, where="train"), "train"
    )
    val = LabelledVolume(
        norm.apply(load_stack(data.val_images)),
        to_classes(load_stack(data.val_labels), 2, where="val"),
        "val",
    )
    return train, val, class_weights(train.labels, 2, True), data.description


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))


def throughput_table(train: LabelledVolume, weights: torch.Tensor, rounds: int = 3) -> None:
    """Each configuration is measured once per round, rounds interleaved, and the median
    of its rounds reported: on a shared machine a burst of load then hits every
    configuration alike instead of one."""
    print(
        f"\nTraining throughput, samples/s (patch {PATCH[0]}², batch {BATCH}, "
        f"{torch.get_num_threads()} CPU threads; median over {rounds} interleaved rounds "
        "of the median of 8 iterations)"
    )
    configs: list[tuple[str, str, int, Callable[[], nn.Module]]] = [
        ("MONAI UNet", "-", 1, monai_unet)
    ]
    for width in WIDTHS:
        for member, frames in MEMBERS.items():

            def make(f: int = frames, w: float = width) -> nn.Module:
                return build_network("deepem3d", frames=f, width=w)

            configs.append((member, f"{width:g}", frames, make))
    measured: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    for _ in range(rounds):
        for i, (_, _, frames, make) in enumerate(configs):
            measured[i].append(samples_per_second(make, frames, train, weights))
    rates = [statistics.median(measured[i]) for i in range(len(configs))]
    widths = (10, 7, 8, 10, 9)
    print(_row(("member", "width", "params", "samples/s", "vs MONAI"), widths))
    for (member, width_s, _, make), rate in zip(configs, rates, strict=True):
        print(
            _row(
                (
                    member,
                    width_s,
                    f"{parameter_count(make()) / 1e6:.2f}M",
                    f"{rate:.1f}",
                    f"{rate / rates[0]:.2f}",
                ),
                widths,
            )
        )


def accuracy_table(
    train: LabelledVolume, val: LabelledVolume, weights: torch.Tensor, minutes: float, width: float
) -> None:
    budget = minutes * 60.0
    lr, opt = DEMO_RECIPE.learning_rate, DEMO_RECIPE.optimizer
    print(
        f"\nAccuracy after {minutes:g} CPU minute(s) per model on cdeep3m-mito validation "
        f"({val.shape[0]} slices of {val.shape[1]}×{val.shape[2]}); {opt}, lr {lr:g}, "
        f"poly 0.8, patch {PATCH[0]}², batch {BATCH}"
    )
    members = []
    iterations = []
    for member, frames in MEMBERS.items():
        net, its = train_for(
            lambda f=frames: build_network("deepem3d", frames=f, width=width),
            frames,
            train,
            weights,
            budget / len(MEMBERS),
            learning_rate=lr,
            optimizer=opt,
        )
        members.append((net, frames))
        iterations.append(f"{member}:{its}")
    ours = evaluate_ensemble(members, val, torch.device("cpu"))
    unet, unet_its = train_for(
        monai_unet, 1, train, weights, budget, learning_rate=lr, optimizer=opt
    )
    theirs = evaluate_ensemble([(unet, 1)], val, torch.device("cpu"))
    widths = (34, 9, 9, 9, 9, 24)
    print(_row(("model", "precision", "recall", "F1", "Jaccard", "iterations"), widths))
    for name, m, its in (
        (f"deep3m DeepEM3D ensemble (w {width:g})", ours, " ".join(iterations)),
        ("MONAI UNet 2D", theirs, str(unet_its)),
    ):
        print(
            _row(
                (
                    name,
                    f"{m['precision']:.3f}",
                    f"{m['recall']:.3f}",
                    f"{m['f1']:.3f}",
                    f"{m['jaccard']:.3f}",
                    its,
                ),
                widths,
            )
        )
    ratio = ours["f1"] / theirs["f1"] if theirs["f1"] else float("inf")
    print(f"F1 ratio deep3m / MONAI: {ratio:.2f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_training")
    parser.add_argument(
        "--minutes",
        type=float,
        default=float(os.environ.get("DEEP3M_BENCH_TRAIN_MINUTES", "2")),
        help="CPU budget per model for the accuracy table",
    )
    parser.add_argument("--width", type=float, default=DEMO_RECIPE.width)
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("DEEP3M_BENCH_THREADS", "1")),
        help="torch CPU threads (default 1: on a shared machine, intra-op threads stall "
        "at every barrier when another process holds a core, which distorts comparisons)",
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args(list(argv) if argv is not None else [])
    torch.set_num_threads(args.threads)
    train, val, w, description = _volumes()
    weights = torch.from_numpy(w)
    print(f"data: {description}")
    if not args.skip_throughput:
        throughput_table(train, weights)
    if not args.skip_accuracy:
        accuracy_table(train, val, weights, args.minutes, args.width)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
