"""Training an unpaired source → target translator, and translating stacks with it.

Alternates a discriminator step and a generator step on random source and target
patches (Adam, β = (0.5, 0.999), constant rate), as CUT and CycleGAN train.
Images enter the generator scaled to [-1, 1]. Runs on the :mod:`runtime`'s device
and precision, reporting and honouring cancellation as every stage does.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from deep3m.models.translation import CUT, GENERATOR_MULTIPLE, CycleGAN
from deep3m.training.adaptation.data import Domain, PatchSampler
from deep3m.training.adaptation.loops import StageLog
from deep3m.training.adaptation.runtime import StageTicker, backward_step, current


def _to_gan(x01: torch.Tensor) -> torch.Tensor:
    return x01 * 2.0 - 1.0


def train_translator(
    model: CUT | CycleGAN,
    source: Domain,
    target: Domain,
    *,
    iterations: int,
    batch: int,
    seed: int,
) -> StageLog:
    cfg = model.config
    runtime = current()
    model.to(runtime.device)
    src = PatchSampler(source, patch=cfg.patch, frames=1, seed=seed, with_labels=False)
    tgt = PatchSampler(target, patch=cfg.patch, frames=1, seed=seed + 1, with_labels=False)
    opt_g = torch.optim.Adam(model.generator_parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    name = f"translation-{cfg.kind}"
    tick = StageTicker(name, iterations, runtime)
    scaler_d, scaler_g = runtime.scaler(), runtime.scaler()
    for it in range(1, iterations + 1):
        a = _to_gan(src.sample(batch)[0])
        b = _to_gan(tgt.sample(batch)[0])
        opt_d.zero_grad(set_to_none=True)
        with runtime.autocast():
            d_loss = model.discriminator_loss(a, b)
        backward_step(d_loss, opt_d, scaler_d)
        opt_g.zero_grad(set_to_none=True)
        # The discriminator is not updated by the generator's step.
        for p in model.discriminator.parameters():
            p.requires_grad_(False)
        with runtime.autocast():
            g_losses = model.generator_losses(a, b, gen)
        backward_step(g_losses["total"], opt_g, scaler_g)
        for p in model.discriminator.parameters():
            p.requires_grad_(True)
        losses.append(float(g_losses["total"].detach()))
        tick(it, losses[-1])
    return StageLog(
        name=name,
        iterations=iterations,
        seconds=time.perf_counter() - started,
        first_loss=losses[0],
        last_loss=losses[-1],
        losses=tuple(losses),
    )


def translate_stack(model: CUT | CycleGAN, stack: np.ndarray) -> np.ndarray:
    """Every slice of a grey-level (z, y, x) stack translated; float32 grey levels 0…255."""
    arr = np.asarray(stack, dtype=np.float32)
    _, h, w = arr.shape
    py, px = (-h) % GENERATOR_MULTIPLE, (-w) % GENERATOR_MULTIPLE
    out = np.empty_like(arr)
    was_training = model.training
    model.eval()
    runtime = current()
    device = next(model.parameters()).device
    try:
        with torch.inference_mode(), runtime.autocast():
            for z in range(arr.shape[0]):
                runtime.stop_if_cancelled(f"while translating slice {z} of {arr.shape[0]}")
                sl = np.pad(arr[z], ((0, py), (0, px)), mode="reflect") if py or px else arr[z]
                x = torch.from_numpy(sl / 127.5 - 1.0).float()[None, None].to(device)
                y = model.translate(x)[0, 0, :h, :w].float().cpu().numpy()
                out[z] = np.clip((y + 1.0) * 127.5, 0.0, 255.0)
    finally:
        model.train(was_training)
    return out
