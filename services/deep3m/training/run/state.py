"""What every step of a member's run shares, and the ranks' agreement under DDP.

Under ``torch.distributed`` every rank runs the same steps; decisions taken on
one clock (out of time, a snapshot due, stop) are rank 0's, broadcast, so
that every rank stops or snapshots at the same iteration. Rank 0 alone writes
to the store and publishes progress.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deep3m.core.events import ProgressEvent
from deep3m.core.store import Store
from deep3m.training.config import TrainConfig
from deep3m.training.precision import autocast, precision_for
from deep3m.training.setup import TrainingSet, make_optimizer

Observer = Callable[[ProgressEvent], None]


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree_int(value: int, device: torch.device, op: Any = None) -> int:
    """Under DDP, every rank adopts rank 0's value (or the ``op`` reduction)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if op is None:
        dist.broadcast(t, 0)
    else:
        dist.all_reduce(t, op=op)
    return int(t.item())


def cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in net.state_dict().items()}


@contextlib.contextmanager
def maybe_no_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    no_sync: Callable[[], contextlib.AbstractContextManager[None]] | None = getattr(
        model, "no_sync", None
    )
    if skip and no_sync is not None:
        with no_sync():
            yield
    else:
        yield


class Run:
    """One member's training run: the state its steps read and update."""

    def __init__(
        self,
        config: TrainConfig,
        member: str,
        store: Store,
        device: torch.device,
        data: TrainingSet,
        net: nn.Module,
        observer: Observer | None,
        job_id: str,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.member = member
        self.frames = config.frames(member)
        self.store = store
        self.device = device
        self.data = data
        self.observer = observer
        self.job_id = job_id or config.model_id
        self.rank, self.world = rank_world()
        self.history: list[dict[str, float]] = []
        self.started = time.monotonic()
        self.clock = clock
        self.clock_started = clock()
        self.elapsed_before = 0.0  # budget time spent before a resume
        # Time-based snapshots follow the wall clock (what a preemption costs), not
        # the budget clock, which may be process CPU time.
        self.last_snapshot = time.monotonic()
        self.precision = precision_for(
            device, mixed_precision=config.mixed_precision, cpu_bfloat16=config.cpu_bfloat16
        )
        self.use_amp = self.precision == "float16"  # float16 needs the gradient scaler
        self.weights = torch.tensor(data.class_weights, device=device)
        self.best_f1 = -1.0
        self.best_iteration = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.resumed_from = 0
        # channels_last is a 4-D layout: networks with 3-D convolutions keep theirs.
        self.channels_last = config.channels_last and all(p.ndim != 5 for p in net.parameters())
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.net = net
        self.optimizer = make_optimizer(config, net)
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp else None
        self.model: nn.Module = net
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.model.train()

    # -- time and budget --------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + self.clock() - self.clock_started

    def out_of_time(self) -> bool:
        budget = self.config.max_minutes * 60.0
        over = bool(budget) and self.elapsed() >= budget
        # Under DDP every rank stops at the same iteration: rank 0's clock decides.
        return bool(agree_int(int(over), self.device))

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.device, self.precision)

    # -- events -------------------------------------------------------------------
    def publish(
        self, iteration: int, metrics: Mapping[str, float], message: str, eta_s: float = 0.0
    ) -> None:
        if self.observer is None or self.rank != 0:
            return
        self.observer(
            ProgressEvent(
                job_id=self.job_id,
                state="RUNNING",
                stage="train",
                task_id=self.member,
                message=message,
                eta_seconds=eta_s,
                metrics={
                    "iteration": float(iteration),
                    "iterations": float(self.config.total_iterations),
                    # Reports carry metrics only: the ETA (capped by a time budget,
                    # which only the trainer knows) travels as one of them.
                    **({"eta_seconds": float(eta_s)} if eta_s > 0 else {}),
                    **metrics,
                },
            )
        )
