"""Train one ensemble member: the loop, snapshots, resume, validation, outputs.

``train_member`` checks the inputs, loads the labelled volumes, builds the
network (from the base model's weights when fine-tuning), and runs CDeep3M's
solver (see ``deep3m.training.config``) for the configured iterations. Every
``snapshot_every`` iterations it writes a snapshot (``deep3m.training.checkpoint``);
a restarted task resumes from the newest one and, because each iteration's
samples are drawn from an RNG seeded by the iteration number, continues exactly
as an uninterrupted run would. Every ``validate_every`` iterations it scores the
validation slices and publishes a ProgressEvent with iteration, loss, val_loss,
precision, recall, f1 and jaccard, and rewrites ``metrics.json`` and
``validation.png``. At the end it writes ``weights.safetensors``.

Devices: CUDA with float16 autocast and a gradient scaler when available (and
``mixed_precision``), else float32 on the CPU. When ``torch.distributed`` is
initialised the network is wrapped in DistributedDataParallel; each rank draws
its own samples, rank 0 alone writes to the store.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from deep3m.core.errors import CancelledError, FailedPreconditionError
from deep3m.core.events import ProgressEvent
from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store
from deep3m.models.card import load_state_dict, save_weights
from deep3m.models.registry import build_network
from deep3m.training import checkpoint as ckpt
from deep3m.training.config import TrainConfig
from deep3m.training.data import (
    LabelledVolume,
    Normalization,
    class_weights,
    compute_normalization,
    iteration_rng,
    read_volume,
    sample_batch,
    to_classes,
)
from deep3m.training.evaluate import evaluate
from deep3m.training.plots import validation_plot
from deep3m.training.validate import CheckedInputs, check_training_inputs, resolve_source

log = logging.getLogger("deep3m.training")

Observer = Callable[[ProgressEvent], None]
VALIDATION_KEYS = ("val_loss", "accuracy", "precision", "recall", "f1", "jaccard")


def member_dir(model_id: str, member: str) -> str:
    return f"models/{model_id}/{member}"


def metrics_key(model_id: str, member: str) -> str:
    return f"{member_dir(model_id, member)}/metrics.json"


def plot_key(model_id: str, member: str) -> str:
    return f"{member_dir(model_id, member)}/validation.png"


@dataclass(frozen=True)
class MemberResult:
    member: str
    frames: int
    iterations: int
    weights: str  # relative to the model folder; empty on ranks other than 0
    metrics: Mapping[str, float]
    history: tuple[Mapping[str, float], ...]
    normalization: Normalization
    resumed_from: int = 0
    seconds: float = 0.0
    state_dict: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class TrainingSet:
    train: LabelledVolume
    validation: LabelledVolume
    validation_source: str  # "validation" or "training" (no validation volume given)
    normalization: Normalization
    class_weights: np.ndarray
    voxel_size_nm: tuple[float, float, float]


def pick_device(device: torch.device | str | None = None) -> torch.device:
    if device is not None and str(device) != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_training_set(
    config: TrainConfig, store: Store, checked: CheckedInputs, *, roots: StoreRoots | None = None
) -> TrainingSet:
    s, key = resolve_source(config.images, store, roots, field="images")
    raw_images = read_volume(s, key, config.images.array, what="images")
    s, key = resolve_source(config.labels, store, roots, field="labels")
    labels = to_classes(
        read_volume(s, key, config.labels.array, what="labels"),
        config.num_classes,
        where=config.labels.describe(),
    )
    if checked.base_card is not None:
        # Fine-tuning keeps the base model's input scaling: its weights expect it.
        norm = Normalization(
            checked.base_card.normalization_mean, checked.base_card.normalization_std
        )
    else:
        norm = compute_normalization(raw_images)
    train = LabelledVolume(norm.apply(raw_images), labels, config.images.describe())
    del raw_images
    if config.validation_images is not None and config.validation_labels is not None:
        s, key = resolve_source(config.validation_images, store, roots, field="validation_images")
        val_raw = read_volume(s, key, config.validation_images.array, what="validation_images")
        s, key = resolve_source(config.validation_labels, store, roots, field="validation_labels")
        val_labels = to_classes(
            read_volume(s, key, config.validation_labels.array, what="validation_labels"),
            config.num_classes,
            where=config.validation_labels.describe(),
        )
        validation = LabelledVolume(
            norm.apply(val_raw), val_labels, config.validation_images.describe()
        )
        source = "validation"
    else:
        validation, source = train, "training"
    voxel = config.voxel_size_nm or tuple(float(v) for v in checked.images.voxel_size_nm)
    return TrainingSet(
        train,
        validation,
        source,
        norm,
        class_weights(labels, config.num_classes, config.class_balance),
        (float(voxel[0]), float(voxel[1]), float(voxel[2])),
    )


def make_optimizer(config: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    lr = config.learning_rate_at(0)
    if config.optimizer == "adam":
        return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        net.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def member_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Class-weighted softmax cross-entropy (Caffe's SoftmaxWithLoss, balanced)."""
    return F.cross_entropy(logits.float(), labels, weight=weights)


def initial_network(
    config: TrainConfig, member: str, store: Store, checked: CheckedInputs | None = None
) -> nn.Module:
    """A seeded fresh network, or the base model's member when fine-tuning."""
    torch.manual_seed(config.seed)
    net = build_network(
        config.architecture,
        frames=config.frames(member),
        width=config.width,
        num_classes=config.num_classes,
    )
    if config.base_model:
        card = checked.base_card if checked is not None and checked.base_card else None
        if card is None:
            from deep3m.models.card import load_card

            card = load_card(store, config.base_model)
        net.load_state_dict(load_state_dict(store, card, member), strict=True)
    return net


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree_int(value: int, device: torch.device, op: Any = None) -> int:
    """Under DDP, every rank adopts rank 0's value (or the ``op`` reduction)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if op is None:
        dist.broadcast(t, 0)
    else:
        dist.all_reduce(t, op=op)
    return int(t.item())


class _Run:
    """State of one member's training run (keeps ``train_member`` readable)."""

    def __init__(
        self,
        config: TrainConfig,
        member: str,
        store: Store,
        device: torch.device,
        data: TrainingSet,
        observer: Observer | None,
        job_id: str,
    ) -> None:
        self.config = config
        self.member = member
        self.frames = config.frames(member)
        self.store = store
        self.device = device
        self.data = data
        self.observer = observer
        self.job_id = job_id or config.model_id
        self.rank, self.world = _rank_world()
        self.history: list[dict[str, float]] = []
        self.started = time.monotonic()
        self.use_amp = device.type == "cuda" and config.mixed_precision
        self.weights = torch.tensor(data.class_weights, device=device)

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
                    **metrics,
                },
            )
        )

    def meta(self) -> dict[str, Any]:
        return {
            "fingerprint": self.config.fingerprint(self.member),
            "normalization": {
                "mean": self.data.normalization.mean,
                "std": self.data.normalization.std,
            },
        }

    def write_metrics(
        self, iteration: int, complete: bool, weights: str = "", resumed_from: int = 0
    ) -> None:
        if self.rank != 0:
            return
        final = self.final_metrics()
        self.store.write_json(
            metrics_key(self.config.model_id, self.member),
            {
                "member": self.member,
                "frames": self.frames,
                "iteration": iteration,
                "iterations": self.config.total_iterations,
                "complete": complete,
                "weights": weights,
                "final": final,
                "history": self.history,
                "normalization": {
                    "mean": self.data.normalization.mean,
                    "std": self.data.normalization.std,
                },
                "class_weights": [float(w) for w in self.data.class_weights],
                "validation_source": self.data.validation_source,
                "voxel_size_nm": list(self.data.voxel_size_nm),
                "fingerprint": self.config.fingerprint(self.member),
                "resumed_from": resumed_from,
                "world_size": self.world,
                "device": self.device.type,
            },
        )
        title = (
            f"{self.config.model_id} {self.member} ({self.config.architecture}, "
            f"width {self.config.width})"
        )
        self.store.write_bytes(
            plot_key(self.config.model_id, self.member), validation_plot(self.history, title)
        )

    def final_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for h in self.history:
            out.update({k: v for k, v in h.items() if k != "lr"})
        return out


def _restore_rng(state: Mapping[str, torch.Tensor]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"].to(torch.uint8))


def completed_member(store: Store, config: TrainConfig, member: str) -> dict[str, Any] | None:
    key = metrics_key(config.model_id, member)
    if not store.exists(key):
        return None
    doc = store.read_json(key)
    if (
        doc.get("complete")
        and doc.get("fingerprint") == config.fingerprint(member)
        and doc.get("weights")
        and store.exists(f"models/{config.model_id}/{doc['weights']}")
    ):
        return dict(doc)
    return None


def result_from_store(
    store: Store, config: TrainConfig, member: str, doc: Mapping[str, Any]
) -> MemberResult:
    from deep3m.models.card import read_safetensors

    state = read_safetensors(store, f"models/{config.model_id}/{doc['weights']}")
    norm = doc.get("normalization", {})
    return MemberResult(
        member=member,
        frames=config.frames(member),
        iterations=int(doc["iterations"]),
        weights=str(doc["weights"]),
        metrics=dict(doc.get("final", {})),
        history=tuple(doc.get("history", ())),
        normalization=Normalization(float(norm.get("mean", 0.0)), float(norm.get("std", 1.0))),
        resumed_from=int(doc.get("resumed_from", 0)),
        state_dict=state,
    )


@contextlib.contextmanager
def _maybe_no_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    no_sync: Callable[[], contextlib.AbstractContextManager[None]] | None = getattr(
        model, "no_sync", None
    )
    if skip and no_sync is not None:
        with no_sync():
            yield
    else:
        yield


def train_member(
    config: TrainConfig,
    member: str,
    store: Store,
    *,
    observer: Observer | None = None,
    cancelled: threading.Event | None = None,
    resume: bool = True,
    device: torch.device | str | None = None,
    roots: StoreRoots | None = None,
    job_id: str = "",
) -> MemberResult:
    """Train (or fine-tune, or resume) one member; returns its result once written.

    Raises InvalidArgumentError/NotFoundError for bad inputs before training,
    CancelledError when ``cancelled`` is set (after writing a snapshot), and
    FailedPreconditionError when the member's folder holds snapshots of a
    different configuration.
    """
    if member not in config.members:
        from deep3m.core.errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"member {member!r} is not one of this job's members {list(config.members)}",
            field="member",
        )
    dev = pick_device(device)
    rank, world = _rank_world()
    if resume and world == 1:
        finished = completed_member(store, config, member)
        if finished is not None:
            log.info("member already trained", extra={"model": config.model_id, "member": member})
            return result_from_store(store, config, member, finished)
    checked = check_training_inputs(config, store, roots=roots)
    data = load_training_set(config, store, checked, roots=roots)
    net = initial_network(config, member, store, checked).to(dev)
    optimizer = make_optimizer(config, net)
    scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" and config.mixed_precision else None
    run = _Run(config, member, store, dev, data, observer, job_id)

    start = 0
    if resume:
        latest = ckpt.latest_checkpoint(store, config.model_id, member) if rank == 0 else None
        start = _agree_int(latest if latest is not None else -1, dev)
        if start >= 0:
            snap = ckpt.load_checkpoint(store, config.model_id, member, start)
            if snap.meta.get("fingerprint") != config.fingerprint(member):
                raise FailedPreconditionError(
                    f"{store.key_url(ckpt.checkpoint_dir(config.model_id, member))} holds "
                    "snapshots of a different training configuration; train under another "
                    "model id or delete that folder",
                    field="model",
                )
            net.load_state_dict(snap.model, strict=True)
            optimizer.load_state_dict(snap.optimizer)
            if scaler is not None and snap.scaler:
                scaler.load_state_dict(snap.scaler)
            _restore_rng(snap.rng)
            run.history = [dict(h) for h in snap.history]
            log.info(
                "resuming from snapshot",
                extra={"model": config.model_id, "member": member, "iteration": start},
            )
        else:
            start = 0
    elif rank == 0:
        ckpt.delete_checkpoints(store, config.model_id, member)
    resumed_from = start

    model: nn.Module = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    model.train()
    total = config.total_iterations
    autocast = (
        torch.autocast("cuda", dtype=torch.float16) if run.use_amp else contextlib.nullcontext()
    )

    def snapshot(iteration: int) -> None:
        if rank != 0:
            return
        rng = {"torch": torch.get_rng_state()}
        ckpt.save_checkpoint(
            store,
            config.model_id,
            member,
            ckpt.Checkpoint(
                iteration=iteration,
                model=net.state_dict(),
                optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict() if scaler is not None else None,
                rng=rng,
                history=tuple(run.history),
                meta=run.meta(),
            ),
        )
        ckpt.prune_checkpoints(store, config.model_id, member, config.checkpoints_kept)
        run.publish(
            iteration,
            {"snapshot_iteration": float(iteration)},
            f"{member}: snapshot at iteration {iteration}",
        )

    from deep3m.runtime.metrics import TRAINING_ITERATIONS

    interval_loss = 0.0
    interval_n = 0
    interval_started = time.monotonic()
    samples_per_iteration = config.batch_size * config.accumulate_gradients * world
    for it in range(start, total):
        stop = cancelled is not None and cancelled.is_set()
        if _agree_int(int(stop), dev, op=dist.ReduceOp.MAX if world > 1 else None):
            snapshot(it)
            run.write_metrics(it, complete=False, resumed_from=resumed_from)
            raise CancelledError(
                f"training of {config.model_id}/{member} cancelled at "
                f"iteration {it}; it resumes from there",
                field="job",
            )
        lr = config.learning_rate_at(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rng = iteration_rng(config.seed, rank, it)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(config.accumulate_gradients):
            x, y = sample_batch(
                data.train,
                rng,
                batch=config.batch_size,
                frames=run.frames,
                patch=config.patch_shape,
                intensity=config.intensity_augmentations,
            )
            xt = torch.from_numpy(x).to(dev, non_blocking=True)
            yt = torch.from_numpy(y).to(dev, non_blocking=True)
            last = micro == config.accumulate_gradients - 1
            with _maybe_no_sync(model, world > 1 and not last):
                with autocast:
                    loss = member_loss(model(xt), yt, run.weights) / config.accumulate_gradients
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
            step_loss += float(loss.detach().item())
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if rank == 0:
            TRAINING_ITERATIONS.inc()
        done = it + 1
        interval_loss += step_loss
        interval_n += 1
        validate_now = done % config.validate_every == 0 or done == total
        if done % config.log_every == 0 or validate_now:
            seconds = max(time.monotonic() - interval_started, 1e-9)
            entry: dict[str, float] = {
                "iteration": float(done),
                "loss": interval_loss / interval_n,
                "lr": lr,
                "samples_per_second": interval_n * samples_per_iteration / seconds,
            }
            eta = seconds / interval_n * (total - done)
            message = f"{member}: iteration {done}/{total}, loss {entry['loss']:.4f}"
            if validate_now and rank == 0:
                scores = evaluate(net, data.validation, run.frames, dev)
                entry.update(scores)
                message += f", val F1 {scores['f1']:.3f}"
            run.history.append(entry)
            run.publish(done, entry, message, eta)
            if validate_now:
                run.write_metrics(done, complete=False, resumed_from=resumed_from)
            interval_loss, interval_n = 0.0, 0
            interval_started = time.monotonic()
        if done % config.snapshot_every == 0 and done < total:
            snapshot(done)

    state = {k: v.detach().to("cpu") for k, v in net.state_dict().items()}
    weights = ""
    if rank == 0:
        weights = save_weights(store, config.model_id, member, state)
        run.write_metrics(total, complete=True, weights=weights, resumed_from=resumed_from)
    seconds = time.monotonic() - run.started
    return MemberResult(
        member=member,
        frames=run.frames,
        iterations=total,
        weights=weights,
        metrics=run.final_metrics(),
        history=tuple(run.history),
        normalization=data.normalization,
        resumed_from=resumed_from,
        seconds=seconds,
        state_dict=state,
    )
