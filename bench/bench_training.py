"""Training throughput: DeepEM3D members and residual U-Nets beside MONAI's 2D UNet.

Training samples per second (forward, class-weighted loss, backward, optimiser step)
of each DeepEM3D member (1fm/3fm/5fm) at several widths, of the residual U-Net at
width 0.5 in float32, with bfloat16 autocast and channels_last (the default recipe's
CPU speed-ups) and with its input downscaled 2× as well, and of
``monai.networks.nets.UNet`` (2D, channels 16…256, 2 residual units) as the baseline,
all on 128² patches, batch 4, on the CPU. Medians of timed iterations after warm-up,
configurations interleaved over rounds. Accuracy per unit of compute is
``python -m bench accuracy``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
from deep3m.training.demo_data import load_stack, sample_paths
from deep3m.training.trainer import make_optimizer, member_loss
from torch import nn

PATCH = (128, 128)
BATCH = 4
WIDTHS = (0.0625, 0.125, 0.25)
MEMBERS = {"1fm": 1, "3fm": 3, "5fm": 5}


def monai_unet(norm: str = "instance") -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
        norm=norm,
    )


def _config(learning_rate: float, iterations: int, optimizer: str) -> TrainConfig:
    src = VolumeSource(path="bench")
    return TrainConfig.create(
        model_id="bench",
        recipe="cdeep3m",
        images=src,
        labels=src,
        iterations=iterations,
        learning_rate=learning_rate,
        optimizer=optimizer,
        patch_shape=PATCH,
        batch_size=BATCH,
        accumulate_gradients=1,
    )


@dataclass(frozen=True)
class Setup:
    """One throughput row: a network and how it runs."""

    name: str
    width: str
    frames: int
    make: Callable[[], nn.Module]
    bf16: bool = False
    channels_last: bool = False


def _step(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    volume: LabelledVolume,
    setup: Setup,
    weights: torch.Tensor,
    it: int,
) -> float:
    x, y = sample_batch(
        volume, iteration_rng(0, 0, it), batch=BATCH, frames=setup.frames, patch=PATCH
    )
    xt = torch.from_numpy(x)
    if setup.channels_last:
        xt = xt.contiguous(memory_format=torch.channels_last)
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup.bf16):
        logits = net(xt)
    loss = member_loss(logits, torch.from_numpy(y), weights)
    loss.backward()
    opt.step()
    return float(loss.item())


def samples_per_second(
    setup: Setup, volume: LabelledVolume, weights: torch.Tensor, *, warmup: int = 3,
    timed: int = 8,
) -> float:  # fmt: skip
    torch.manual_seed(0)
    net = setup.make()
    if setup.channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = make_optimizer(_config(1e-2, 1000, "sgd"), net)
    for it in range(warmup):
        _step(net, opt, volume, setup, weights, it)
    times = []
    for it in range(warmup, warmup + timed):
        started = time.perf_counter()
        _step(net, opt, volume, setup, weights, it)
        times.append(time.perf_counter() - started)
    return BATCH / statistics.median(times)


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

    def network(
        architecture: str, frames: int, width: float, scale: int = 1
    ) -> Callable[[], nn.Module]:
        return lambda: build_network(architecture, frames=frames, width=width, input_scale=scale)

    configs = [Setup("MONAI UNet", "-", 1, monai_unet)]
    for width in WIDTHS:
        for member, frames in MEMBERS.items():
            configs.append(Setup(member, f"{width:g}", frames, network("deepem3d", frames, width)))
    resunet = network("resunet2d", 1, 0.5)
    fast = {"bf16": True, "channels_last": True}
    configs += [
        # bfloat16 beside the float32 row above (the dilated heads run in float32;
        # DeepEM3D has no channels_last layout: some of its weights are not 4-D).
        Setup("3fm bf16", "0.125", 3, network("deepem3d", 3, 0.125), bf16=True),
        Setup("unet2d bf16+cl (default)", "0.5", 1, network("unet2d", 1, 0.5), **fast),
        Setup("resunet2d fp32", "0.5", 1, resunet),
        Setup("resunet2d bf16+cl", "0.5", 1, resunet, **fast),
        Setup("resunet2d x2 bf16+cl", "0.5", 1, network("resunet2d", 1, 0.5, 2), **fast),
    ]
    measured: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    for _ in range(rounds):
        for i, setup in enumerate(configs):
            measured[i].append(samples_per_second(setup, train, weights))
    rates = [statistics.median(measured[i]) for i in range(len(configs))]
    widths = (26, 7, 8, 10, 9)
    print(_row(("network", "width", "params", "samples/s", "vs MONAI"), widths))
    for setup, rate in zip(configs, rates, strict=True):
        print(
            _row(
                (
                    setup.name,
                    setup.width,
                    f"{parameter_count(setup.make()) / 1e6:.2f}M",
                    f"{rate:.1f}",
                    f"{rate / rates[0]:.2f}",
                ),
                widths,
            )
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_training")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("DEEP3M_BENCH_THREADS", "1")),
        help="torch CPU threads (default 1: on a shared machine, intra-op threads stall "
        "at every barrier when another process holds a core, which distorts comparisons)",
    )
    args = parser.parse_args(list(argv) if argv is not None else [])
    torch.set_num_threads(args.threads)
    train, _, w, description = _volumes()
    weights = torch.from_numpy(w)
    print(f"data: {description}")
    throughput_table(train, weights)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
