"""Where and how the adaptation stages run: device, autocast, progress, cancellation.

The stages (translator, pretext, Y-Net stages, segmentation) are plain loops in
their own modules; the member sets one :class:`StageRuntime` around the whole
procedure (:func:`use`) and the loops read it (:func:`current`), so every stage
runs on the worker's device under the supervised trainer's precision rule,
reports its loss every few seconds and stops within one iteration of a
cancellation (whole-stack prediction and translation, e.g. a candidate's scoring,
within one batch). Outside :func:`use` the stages run on the CPU in float32, silently.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from deep3m.core.errors import CancelledError
from deep3m.runtime.task import StopFlag
from deep3m.training.precision import autocast

PROGRESS_SECONDS = 2.0


@dataclass(frozen=True)
class StageProgress:
    stage: str
    iteration: int
    iterations: int
    loss: float
    seconds: float  # since the stage started


@dataclass(frozen=True)
class StageRuntime:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "float32"
    on_progress: Callable[[StageProgress], object] | None = None
    cancelled: StopFlag | None = None
    progress_seconds: float = PROGRESS_SECONDS
    clock: Callable[[], float] = time.monotonic

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.device, self.precision)

    def scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler where float16 needs one (CUDA), else None."""
        if self.precision == "float16" and self.device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None

    def check(self, stage: str, iteration: int) -> None:
        self.stop_if_cancelled(f"in stage {stage!r} at iteration {iteration}")

    def stop_if_cancelled(self, where: str) -> None:
        """CancelledError (saying ``where``) once the run is cancelled."""
        if self.cancelled is not None and self.cancelled.is_set():
            raise CancelledError(f"adaptation cancelled {where}")


_DEFAULT = StageRuntime()
_CURRENT: ContextVar[StageRuntime | None] = ContextVar("adaptation_runtime", default=None)


def current() -> StageRuntime:
    return _CURRENT.get() or _DEFAULT


@contextlib.contextmanager
def use(runtime: StageRuntime) -> Iterator[StageRuntime]:
    token = _CURRENT.set(runtime)
    try:
        yield runtime
    finally:
        _CURRENT.reset(token)


class StageTicker:
    """Per-iteration bookkeeping of one stage: cancellation, and a progress report at
    most every ``progress_seconds`` (and at the last iteration)."""

    def __init__(self, stage: str, iterations: int, runtime: StageRuntime | None = None) -> None:
        self.runtime = runtime or current()
        self.stage = stage
        self.iterations = iterations
        self.started = self.runtime.clock()
        self.last = self.started
        self.runtime.check(stage, 0)

    def __call__(self, iteration: int, loss: float) -> None:
        rt = self.runtime
        now = rt.clock()
        if rt.on_progress is not None and (
            now - self.last >= rt.progress_seconds or iteration == self.iterations
        ):
            self.last = now
            rt.on_progress(
                StageProgress(self.stage, iteration, self.iterations, loss, now - self.started)
            )
        rt.check(self.stage, iteration)


def backward_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    """``loss.backward(); optimizer.step()``, through the scaler where there is one."""
    if scaler is None:
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        return
    scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
    scaler.step(optimizer)
    scaler.update()
