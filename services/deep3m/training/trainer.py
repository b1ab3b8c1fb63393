"""Train one ensemble member: the loop, snapshots, resume, validation, outputs.

``train_member`` checks the inputs, loads the labelled volumes, builds the
network (from the base model's weights when fine-tuning), and runs CDeep3M's
solver (see ``deep3m.training.config``) for the configured iterations. Every
``snapshot_every`` iterations, and every ``snapshot_every_minutes`` of wall time,
it writes a snapshot (``deep3m.training.checkpoint``), and one more when told to
stop (the job cancelled, or the worker going away);
a restarted task resumes from the newest one and, because each iteration's
samples are drawn from an RNG seeded by the iteration number, continues exactly
as an uninterrupted run would. Every ``validate_every`` iterations it scores the
validation slices and publishes a ProgressEvent with iteration, loss, val_loss,
precision, recall, f1 and jaccard, and rewrites ``metrics.json`` and
``validation.png``. At the end it writes ``weights.safetensors``: the last weights,
or with ``keep_best`` those of the best validation F1 (kept as ``best.safetensors``
while training), and in ``metrics.json`` the probability threshold that scores
best on the validation slices.

A budget in minutes (``max_minutes``) ends the run at that time (or at
``iterations``, whichever comes first); the learning-rate schedule then runs on the
larger of the two fractions. The clock is injectable (``clock=``): the accuracy
benchmark passes process CPU time so that candidates sharing a busy machine get
equal compute. A run resumed under a time budget carries its elapsed time over,
but its samples after the resume follow the iteration count, not the clock.

The run is a sequence of steps, one module each in ``deep3m.training.run``:
``resume`` (from the newest snapshot), ``iteration`` (one optimiser step),
``selection`` (loss, iterations/s, ETA, validation, the best weights),
``snapshot`` (by iterations and by wall time), ``finish``, and ``loop``. The
set-up (device, training set, network, optimiser) is ``deep3m.training.setup``;
the member's documents in the store are ``deep3m.training.outputs``.

Devices: CUDA with float16 autocast and a gradient scaler when available (and
``mixed_precision``); on the CPU float32, or bfloat16 autocast with
``cpu_bfloat16``; ``channels_last`` memory format when asked. When ``torch.distributed`` is
initialised the network is wrapped in DistributedDataParallel; each rank draws
its own samples, rank 0 alone writes to the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store
from deep3m.runtime.task import StopFlag
from deep3m.training.config import TrainConfig
from deep3m.training.outputs import (
    MemberResult,
    best_key,
    completed_member,
    member_dir,
    metrics_key,
    plot_key,
    result_from_store,
)
from deep3m.training.run.finish import finish
from deep3m.training.run.loop import loop
from deep3m.training.run.resume import restore
from deep3m.training.run.state import Observer, Run, rank_world
from deep3m.training.setup import (
    TrainingSet,
    initial_network,
    load_training_set,
    make_optimizer,
    member_loss,
    pick_device,
)
from deep3m.training.validate import LocatedVolumes, check_training_inputs

# Callers import these from here; they live in the modules named above.
__all__ = [
    "MemberResult",
    "Observer",
    "StopFlag",
    "TrainingSet",
    "best_key",
    "completed_member",
    "initial_network",
    "load_training_set",
    "make_optimizer",
    "member_dir",
    "member_loss",
    "metrics_key",
    "pick_device",
    "plot_key",
    "result_from_store",
    "train_member",
]

log = logging.getLogger("deep3m.training")


def train_member(
    config: TrainConfig,
    member: str,
    store: Store,
    *,
    observer: Observer | None = None,
    cancelled: StopFlag | None = None,
    resume: bool = True,
    device: torch.device | str | None = None,
    roots: StoreRoots | None = None,
    job_id: str = "",
    clock: Callable[[], float] = time.monotonic,
    located: LocatedVolumes | None = None,
) -> MemberResult:
    """Train (or fine-tune, or resume) one member; returns its result once written.

    Raises InvalidArgumentError/NotFoundError for bad inputs before training,
    CancelledError when ``cancelled`` is set (after writing a snapshot), and
    FailedPreconditionError when the member's folder holds snapshots of a
    different configuration. Volumes in ``located`` (resolved and checked at
    submission) are read where they are, not looked up again.
    """
    if member not in config.members:
        from deep3m.core.errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"member {member!r} is not one of this job's members {list(config.members)}",
            field="member",
        )
    dev = pick_device(device)
    _, world = rank_world()
    if resume and world == 1:
        finished = completed_member(store, config, member)
        if finished is not None:
            log.info("member already trained", extra={"model": config.model_id, "member": member})
            return result_from_store(store, config, member, finished)
    checked = check_training_inputs(config, store, roots=roots, located=located)
    data = load_training_set(config, store, checked, roots=roots, located=located)
    net = initial_network(config, member, store, checked).to(dev)
    run = Run(config, member, store, dev, data, net, observer, job_id, clock)
    start = restore(run, resume)
    done = loop(run, start, cancelled)
    return finish(run, done)
