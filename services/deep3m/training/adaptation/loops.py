"""One optimisation loop for every adaptation stage.

A stage is a loss closure, the modules it trains, the modules it freezes and an
optimiser schedule (Adam with the one-cycle policy, as in the paper's code, or
plain SGD / Adam at a constant rate). Every ``checkpoint_every`` iterations and
at the end, ``on_checkpoint(iteration, state)`` is called so candidates can be
scored (and the optimiser's state kept); ``resume`` continues a stage after such a
checkpoint.
The loop runs on the :mod:`runtime`'s device and precision, reports its loss every
few seconds and stops within one iteration of a cancellation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deep3m.core.errors import InvalidArgumentError
from deep3m.training.adaptation.runtime import StageTicker, backward_step, current

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class Schedule:
    iterations: int
    max_lr: float
    optimizer: str = "adam"
    one_cycle: bool = True

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise InvalidArgumentError(
                f"iterations must be >= 1, got {self.iterations!r}", field="iterations"
            )
        if not self.max_lr > 0:
            raise InvalidArgumentError(
                f"learning rate must be > 0, got {self.max_lr!r}", field="lr"
            )
        if self.optimizer not in OPTIMIZERS:
            raise InvalidArgumentError(
                f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}", field="optimizer"
            )


@dataclass(frozen=True)
class StageLog:
    name: str
    iterations: int
    seconds: float
    first_loss: float
    last_loss: float
    losses: tuple[float, ...]


@dataclass(frozen=True)
class StageState:
    """Where a stage stands at a checkpoint: what continuing it needs."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    losses: Sequence[float]


@dataclass(frozen=True)
class StageResume:
    """A stage's state after ``iteration`` (as a :class:`StageState` held it), to go on from."""

    iteration: int
    optimizer: Mapping[str, Any]
    scheduler: Mapping[str, Any] | None
    losses: tuple[float, ...]


def _optimizer(params: list[nn.Parameter], schedule: Schedule) -> torch.optim.Optimizer:
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(params, lr=schedule.max_lr, momentum=0.9)
    return torch.optim.Adam(params, lr=schedule.max_lr)


def run_stage(
    name: str,
    loss_fn: Callable[[], torch.Tensor],
    *,
    train: Sequence[nn.Module],
    schedule: Schedule,
    frozen: Sequence[nn.Module] = (),
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[int, StageState], object] | None = None,
    resume: StageResume | None = None,
) -> StageLog:
    """Minimise ``loss_fn()`` over ``train``'s parameters (minus ``frozen``'s)."""
    frozen_ids = {id(p) for m in frozen for p in m.parameters()}
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in train:
        for p in module.parameters():
            if id(p) not in frozen_ids and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise InvalidArgumentError(f"stage {name!r} has nothing to train", field="stage")
    saved = {id(p): p.requires_grad for m in frozen for p in m.parameters()}
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    runtime = current()
    for module in (*train, *frozen):
        module.to(runtime.device)
    opt = _optimizer(params, schedule)
    scaler = runtime.scaler()
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=schedule.max_lr, total_steps=schedule.iterations
        )
        if schedule.one_cycle
        else None
    )
    losses: list[float] = []
    start = 0
    if resume is not None:
        opt.load_state_dict(dict(resume.optimizer))
        if sched is not None and resume.scheduler is not None:
            sched.load_state_dict(dict(resume.scheduler))
        losses, start = list(resume.losses), resume.iteration
    for module in train:
        module.train()
    started = time.perf_counter()
    tick = StageTicker(name, schedule.iterations, runtime)
    try:
        for it in range(start + 1, schedule.iterations + 1):
            for m in frozen:
                m.eval()  # frozen normalisation keeps its statistics too
            opt.zero_grad(set_to_none=True)
            with runtime.autocast():
                loss = loss_fn()
            backward_step(loss, opt, scaler)
            if sched is not None:
                sched.step()
            losses.append(float(loss.detach()))
            tick(it, losses[-1])
            if on_checkpoint is not None and (
                it == schedule.iterations or (checkpoint_every and it % checkpoint_every == 0)
            ):
                on_checkpoint(it, StageState(opt, sched, losses))
    finally:
        for m in frozen:
            for p in m.parameters():
                p.requires_grad_(saved.get(id(p), True))
    return StageLog(
        name=name,
        iterations=schedule.iterations,
        seconds=time.perf_counter() - started,
        first_loss=losses[0],
        last_loss=losses[-1],
        losses=tuple(losses),
    )
