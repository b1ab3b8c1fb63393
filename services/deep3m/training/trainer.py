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

The run is a sequence of steps on ``_Run``: ``restore`` (from the newest
snapshot), ``step`` (one optimiser step), ``report`` (loss, iterations/s, ETA,
validation), ``snapshot`` and ``finish``.

Devices: CUDA with float16 autocast and a gradient scaler when available (and
``mixed_precision``); on the CPU float32, or bfloat16 autocast with
``cpu_bfloat16``; ``channels_last`` memory format when asked. When ``torch.distributed`` is
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
from deep3m.training.evaluate import best_threshold, evaluate, foreground_probabilities
from deep3m.training.objectives import training_loss
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
    lr = config.learning_rate_at(0, 0.0)
    if config.optimizer == "adam":
        return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        net.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def member_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Class-weighted softmax cross-entropy (Caffe's SoftmaxWithLoss, balanced)."""
    return training_loss("ce", logits, labels, weights)


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
        input_scale=config.input_scale,
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


def best_key(model_id: str, member: str) -> str:
    return f"{member_dir(model_id, member)}/best.safetensors"


def _cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in net.state_dict().items()}


class _Run:
    """One member's training run, in steps: restore, step, report, snapshot, finish."""

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
        self.rank, self.world = _rank_world()
        self.history: list[dict[str, float]] = []
        self.started = time.monotonic()
        self.clock = clock
        self.clock_started = clock()
        self.elapsed_before = 0.0  # budget time spent before a resume
        self.use_amp = device.type == "cuda" and config.mixed_precision
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
        return bool(_agree_int(int(over), self.device))

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.use_amp:
            return torch.autocast("cuda", dtype=torch.float16)
        if self.device.type == "cpu" and self.config.cpu_bfloat16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- events and documents ---------------------------------------------------
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

    def meta(self) -> dict[str, Any]:
        return {
            "fingerprint": self.config.fingerprint(self.member),
            "normalization": {
                "mean": self.data.normalization.mean,
                "std": self.data.normalization.std,
            },
            "elapsed_s": self.elapsed(),
            "best_f1": self.best_f1,
            "best_iteration": self.best_iteration,
        }

    def write_metrics(
        self, iteration: int, complete: bool, weights: str = "", extra: Mapping[str, Any] = {}
    ) -> None:
        if self.rank != 0:
            return
        self.store.write_json(
            metrics_key(self.config.model_id, self.member),
            {
                "member": self.member,
                "frames": self.frames,
                "iteration": iteration,
                "iterations": self.config.total_iterations,
                "complete": complete,
                "weights": weights,
                "final": self.final_metrics(),
                "history": self.history,
                "normalization": {
                    "mean": self.data.normalization.mean,
                    "std": self.data.normalization.std,
                },
                "class_weights": [float(w) for w in self.data.class_weights],
                "validation_source": self.data.validation_source,
                "voxel_size_nm": list(self.data.voxel_size_nm),
                "fingerprint": self.config.fingerprint(self.member),
                "resumed_from": self.resumed_from,
                "world_size": self.world,
                "device": self.device.type,
                "best_iteration": self.best_iteration,
                "elapsed_s": self.elapsed(),
                **extra,
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
        """The latest figures; with ``keep_best``, validation figures of the kept weights."""
        out: dict[str, float] = {}
        for h in self.history:
            out.update({k: v for k, v in h.items() if k != "lr"})
        if self.config.keep_best and self.best_iteration:
            for h in self.history:
                if int(h.get("iteration", -1)) == self.best_iteration and "f1" in h:
                    out.update({k: h[k] for k in VALIDATION_KEYS if k in h})
        return out

    # -- steps ------------------------------------------------------------------
    def restore(self, resume: bool) -> int:
        """The iteration to start from: the newest snapshot's, or 0."""
        config, store, member = self.config, self.store, self.member
        if not resume:
            if self.rank == 0:
                ckpt.delete_checkpoints(store, config.model_id, member)
                if store.exists(best_key(config.model_id, member)):
                    store.delete(best_key(config.model_id, member))
            return 0
        latest = ckpt.latest_checkpoint(store, config.model_id, member) if self.rank == 0 else None
        start = _agree_int(latest if latest is not None else -1, self.device)
        if start < 0:
            return 0
        snap = ckpt.load_checkpoint(store, config.model_id, member, start)
        if snap.meta.get("fingerprint") != config.fingerprint(member):
            raise FailedPreconditionError(
                f"{store.key_url(ckpt.checkpoint_dir(config.model_id, member))} holds "
                "snapshots of a different training configuration; train under another "
                "model id or delete that folder",
                field="model",
            )
        self.net.load_state_dict(snap.model, strict=True)
        self.optimizer.load_state_dict(snap.optimizer)
        if self.scaler is not None and snap.scaler:
            self.scaler.load_state_dict(snap.scaler)
        _restore_rng(snap.rng)
        self.history = [dict(h) for h in snap.history]
        self.elapsed_before = float(snap.meta.get("elapsed_s", 0.0))
        self.best_f1 = float(snap.meta.get("best_f1", -1.0))
        self.best_iteration = int(snap.meta.get("best_iteration", 0))
        if self.best_iteration and store.exists(best_key(config.model_id, member)):
            from safetensors.torch import load as load_safetensors

            self.best_state = load_safetensors(store.read_bytes(best_key(config.model_id, member)))
        log.info(
            "resuming from snapshot",
            extra={"model": config.model_id, "member": member, "iteration": start},
        )
        self.resumed_from = start
        return start

    def snapshot(self, iteration: int) -> None:
        if self.rank != 0:
            return
        config = self.config
        ckpt.save_checkpoint(
            self.store,
            config.model_id,
            self.member,
            ckpt.Checkpoint(
                iteration=iteration,
                model=self.net.state_dict(),
                optimizer=self.optimizer.state_dict(),
                scaler=self.scaler.state_dict() if self.scaler is not None else None,
                rng={"torch": torch.get_rng_state()},
                history=tuple(self.history),
                meta=self.meta(),
            ),
        )
        ckpt.prune_checkpoints(self.store, config.model_id, self.member, config.checkpoints_kept)
        self.publish(
            iteration,
            {"snapshot_iteration": float(iteration)},
            f"{self.member}: snapshot at iteration {iteration}",
        )

    def step(self, it: int) -> tuple[float, float]:
        """One optimiser step (with gradient accumulation); returns (loss, lr)."""
        config = self.config
        lr = config.learning_rate_at(it, self.elapsed())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rng = iteration_rng(config.seed, self.rank, it)
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        memory = torch.channels_last if self.channels_last else torch.contiguous_format
        for micro in range(config.accumulate_gradients):
            x, y = sample_batch(
                self.data.train,
                rng,
                batch=config.batch_size,
                frames=self.frames,
                patch=config.patch_shape,
                intensity=config.intensity_augmentations,
                foreground_fraction=config.foreground_fraction,
            )
            xt = torch.from_numpy(x).to(self.device, non_blocking=True)
            xt = xt.contiguous(memory_format=memory)
            yt = torch.from_numpy(y).to(self.device, non_blocking=True)
            last = micro == config.accumulate_gradients - 1
            with _maybe_no_sync(self.model, self.world > 1 and not last):
                with self.autocast():
                    logits = self.model(xt)
                loss = (
                    training_loss(config.loss, logits, yt, self.weights)
                    / config.accumulate_gradients
                )
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            step_loss += float(loss.detach().item())
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return step_loss, lr

    def validate(self, done: int) -> dict[str, float]:
        """Validation figures; keeps the weights when they are the best so far."""
        with self.autocast():  # bfloat16 where training uses it: half the CPU time
            scores = evaluate(self.net, self.data.validation, self.frames, self.device)
        if scores["f1"] > self.best_f1:
            self.best_f1, self.best_iteration = scores["f1"], done
            if self.config.keep_best:
                from safetensors.torch import save as save_safetensors

                self.best_state = _cpu_state(self.net)
                self.store.write_bytes(
                    best_key(self.config.model_id, self.member),
                    save_safetensors(self.best_state),
                )
        return scores

    def loop(self, start: int, cancelled: threading.Event | None) -> int:
        """Steps from ``start`` until the iterations or the time budget run out."""
        from deep3m.runtime.metrics import TRAINING_ITERATIONS

        config, total = self.config, self.config.total_iterations
        interval_loss, interval_n = 0.0, 0
        interval_started = time.monotonic()
        samples_per_iteration = config.batch_size * config.accumulate_gradients * self.world
        done = start
        for it in range(start, total):
            stop = cancelled is not None and cancelled.is_set()
            if _agree_int(int(stop), self.device, op=dist.ReduceOp.MAX if self.world > 1 else None):
                self.snapshot(it)
                self.write_metrics(it, complete=False)
                raise CancelledError(
                    f"training of {config.model_id}/{self.member} cancelled at "
                    f"iteration {it}; it resumes from there",
                    field="job",
                )
            step_loss, lr = self.step(it)
            if self.rank == 0:
                TRAINING_ITERATIONS.inc()
            done = it + 1
            interval_loss += step_loss
            interval_n += 1
            final = done == total or self.out_of_time()
            validate_now = done % config.validate_every == 0 or final
            if done % config.log_every == 0 or validate_now:
                seconds = max(time.monotonic() - interval_started, 1e-9)
                self.report(done, interval_loss / interval_n, lr, interval_n, seconds,
                            samples_per_iteration, validate_now)  # fmt: skip
                interval_loss, interval_n = 0.0, 0
                interval_started = time.monotonic()
            if final:
                break
            if done % config.snapshot_every == 0:
                self.snapshot(done)
        return done

    def report(
        self, done: int, loss: float, lr: float, steps: int, seconds: float,
        samples_per_iteration: int, validate_now: bool,
    ) -> None:  # fmt: skip
        """History entry and progress event: loss, iterations/s, ETA, validation."""
        config, total = self.config, self.config.total_iterations
        per_step = seconds / steps
        eta = per_step * (total - done)
        if config.max_minutes:
            eta = min(eta, max(config.max_minutes * 60.0 - self.elapsed(), 0.0))
        entry: dict[str, float] = {
            "iteration": float(done),
            "loss": loss,
            "lr": lr,
            "samples_per_second": steps * samples_per_iteration / seconds,
            "iterations_per_second": steps / seconds,
            "elapsed_seconds": self.elapsed(),
        }
        message = f"{self.member}: iteration {done}/{total}, loss {loss:.4f}"
        if validate_now and self.rank == 0:
            scores = self.validate(done)
            entry.update(scores)
            message += f", val F1 {scores['f1']:.3f}"
        self.history.append(entry)
        # Every event carries the latest validation figures (``latest_f1`` …) so a
        # progress display need not remember them; validation events also the bare keys.
        latest: dict[str, float] = {}
        for h in self.history:
            if "f1" in h:
                latest = {f"latest_{k}": h[k] for k in VALIDATION_KEYS if k in h}
                latest["latest_validation_iteration"] = h["iteration"]
        self.publish(done, {**latest, **entry}, message, eta)
        if validate_now:
            self.write_metrics(done, complete=False)

    def finish(self, done: int) -> MemberResult:
        """Write the kept weights and the validation-chosen threshold."""
        config = self.config
        if config.keep_best and self.best_state is not None:
            self.net.load_state_dict(self.best_state, strict=True)
        state = _cpu_state(self.net)
        weights = ""
        extra: dict[str, Any] = {}
        if self.rank == 0:
            # The threshold with the best F1 on the validation slices (the training
            # slices when no validation volume was given: validation_source says which).
            with self.autocast():
                probs = foreground_probabilities([(self.net, self.frames, 1.0)],
                                                 self.data.validation, self.device)  # fmt: skip
            threshold, f1 = best_threshold(probs, self.data.validation.labels > 0)
            extra = {"threshold": threshold, "threshold_f1": f1}
            weights = save_weights(self.store, config.model_id, self.member, state)
            self.write_metrics(done, complete=True, weights=weights, extra=extra)
        return MemberResult(
            member=self.member,
            frames=self.frames,
            iterations=done,
            weights=weights,
            metrics=self.final_metrics(),
            history=tuple(self.history),
            normalization=self.data.normalization,
            resumed_from=self.resumed_from,
            seconds=time.monotonic() - self.started,
            state_dict=state,
        )


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
        iterations=int(doc["iteration"]),
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
    clock: Callable[[], float] = time.monotonic,
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
    _, world = _rank_world()
    if resume and world == 1:
        finished = completed_member(store, config, member)
        if finished is not None:
            log.info("member already trained", extra={"model": config.model_id, "member": member})
            return result_from_store(store, config, member, finished)
    checked = check_training_inputs(config, store, roots=roots)
    data = load_training_set(config, store, checked, roots=roots)
    net = initial_network(config, member, store, checked).to(dev)
    run = _Run(config, member, store, dev, data, net, observer, job_id, clock)
    start = run.restore(resume)
    done = run.loop(start, cancelled)
    return run.finish(done)
