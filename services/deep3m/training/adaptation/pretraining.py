"""The unsupervised stages some methods run before the supervised one: the SSL
restoration pretext, and stages 1 and 2 of the multi-task Y-Net."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deep3m.adaptation.histogram import HistogramReference, match_stack
from deep3m.adaptation.pretext import degrade
from deep3m.models.ynet import AttentionYNet
from deep3m.training.adaptation.data import Domain, PatchSampler
from deep3m.training.adaptation.loops import Schedule, StageLog, run_stage
from deep3m.training.adaptation.networks import reconstruction
from deep3m.training.adaptation.spec import AdaptationSpec

SSL_PRETEXT_LR = 5e-4
SSL_FINETUNE_LR = 1e-4
YNET_ALPHAS = (0.98, 1.0, 0.0)
YNET_BETAS = (0.02, 0.0, 1.0)
YNET_LRS = (1e-3, 2e-4, 2e-4)


def _unlabelled(*domains: Domain) -> Domain:
    images = tuple(s for d in domains for s in d.images)
    return Domain("+".join(d.name for d in domains), images)


def ssl_pretext(net: nn.Module, spec: AdaptationSpec, source: Domain, target: Domain) -> StageLog:
    """Restore clean source and target patches from noisy, ×½-resolution copies."""
    pool = _unlabelled(source, target)
    sampler = PatchSampler(
        pool, patch=spec.patch, frames=spec.frames, seed=spec.seed + 200, with_labels=False
    )
    gen = torch.Generator().manual_seed(spec.seed)
    centre = spec.frames // 2

    def step() -> torch.Tensor:
        clean, _ = sampler.sample(spec.batch)
        return F.mse_loss(reconstruction(net, degrade(clean, generator=gen)), clean[:, centre])

    return run_stage(
        "ssl-pretext",
        step,
        train=[net],
        schedule=Schedule(spec.unsupervised_iterations, SSL_PRETEXT_LR),
    )


YNET_STAGES = ("ynet-stage1", "ynet-stage2")


def ynet_unsupervised(
    net: AttentionYNet,
    spec: AdaptationSpec,
    source: Domain,
    target: Domain,
    target_hist: HistogramReference,
) -> list[StageLog]:
    """Stages 1 and 2 of the Y-Net schedule (half the unsupervised budget each)."""
    matched = [match_stack(s, target_hist) for s in source.images]
    return [ynet_stage(net, spec, source, target, matched, stage) for stage in (0, 1)]


def ynet_stage(
    net: AttentionYNet,
    spec: AdaptationSpec,
    source: Domain,
    target: Domain,
    matched: list[np.ndarray],
    stage: int,
) -> StageLog:
    """Stage ``stage + 1`` of the Y-Net schedule; ``matched`` is the source matched to
    the target's histogram (stage 2's online augmentation)."""
    first = max(1, spec.unsupervised_iterations // 2)
    iters = first if stage == 0 else max(1, spec.unsupervised_iterations - first)
    alpha, beta = YNET_ALPHAS[stage], YNET_BETAS[stage]
    src = PatchSampler(
        source,
        patch=spec.patch,
        frames=1,
        seed=spec.seed + 300 + stage,
        alternate=matched if stage == 1 else None,
        alternate_p=spec.histogram_p if stage == 1 else 0.0,
    )
    tgt = PatchSampler(
        target, patch=spec.patch, frames=1, seed=spec.seed + 400 + stage, with_labels=False
    )
    turn = [0]

    def step() -> torch.Tensor:
        # One domain per batch, alternating; BCE only where labels exist.
        turn[0] += 1
        if turn[0] % 2:
            x, y = src.sample(spec.batch)
        else:
            x, y = tgt.sample(spec.batch)
        image, mask = net(x)
        loss = alpha * F.mse_loss(image, x)
        if y is not None and beta > 0:
            loss = loss + beta * F.binary_cross_entropy_with_logits(mask[:, 0], y.float())
        return loss

    return run_stage(
        YNET_STAGES[stage],
        step,
        train=[net],
        schedule=Schedule(
            iters,
            YNET_LRS[stage],
            optimizer="sgd" if stage == 0 else "adam",
            one_cycle=False,
        ),
    )
