"""The training role's task handlers: ``train`` (one per member) and ``finalize``.

``train`` trains one member (task param ``member``) of the job's TrainSpec,
resuming from the member's newest snapshot when the task is a retry (a worker
that died mid-training is replaced and continues, not restarts); progress goes
to the scheduler through ``ctx.report``; ``ctx.cancelled`` (the job cancelled)
and ``ctx.stopping`` (the worker going away: the task is given back) stop it
after a snapshot. Volumes are read where the scheduler resolved them at
submission (``lease.volumes``). With several visible GPUs the member trains
data-parallel over all of them. ``finalize`` assembles ``models/<id>/model.json`` from the members'
weights and metrics, scoring the ensemble on the validation slices; it rewrites
the same card when retried.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from deep3m.core.errors import FailedPreconditionError, InvalidArgumentError
from deep3m.core.events import ProgressEvent
from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store, VolumeInfo
from deep3m.models.card import MemberCard, ModelCard, card_key, load_card, save_card
from deep3m.models.registry import INPUT_MULTIPLE, build_network, seamless_halo_yx
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import TaskContext, TaskResult
from deep3m.training.adaptation.member import CANDIDATE_METRIC, adapt_member
from deep3m.training.config import TrainConfig
from deep3m.training.data import LabelledVolume, Normalization, read_volume, to_classes
from deep3m.training.distributed import train_member_distributed, visible_gpus
from deep3m.training.evaluate import evaluate_ensemble, foreground_probabilities, select_ensemble
from deep3m.training.trainer import (
    MemberResult,
    completed_member,
    metrics_key,
    pick_device,
    plot_key,
    train_member,
)
from deep3m.training.validate import Located, LocatedVolumes, resolve_source
from deep3m.v1 import common_pb2

# What the card keeps of each member's adaptation choice.
CHOSEN_FIELDS = ("chosen_checkpoint", "chosen_iteration", "chosen_figures", "choice", "fallback")


def _task_result(metrics: Mapping[str, float], outputs: Mapping[str, str]) -> TaskResult:
    return TaskResult(metrics=dict(metrics), outputs=dict(outputs))


def _config(lease: common_pb2.TaskLease) -> TrainConfig:
    if lease.spec.WhichOneof("kind") != "train":
        raise InvalidArgumentError(
            f"task {lease.task.id!r} is not part of a training job", field="spec.train"
        )
    return TrainConfig.from_spec(lease.spec.train)


def located_volumes(lease: common_pb2.TaskLease, roots: StoreRoots) -> dict[str, Located]:
    """The job's input volumes as resolved and checked by the scheduler at submission."""
    out = {}
    for name, v in lease.volumes.items():
        info = VolumeInfo(
            v.path, tuple(v.shape), v.dtype, tuple(v.grid), None, tuple(v.voxel_size_nm), True
        )
        out[name] = Located(roots.store(v.store_url, field=f"{name}.store_url"), v.path, info)
    return out


class TrainingTasks:
    """Handlers bound to one role's settings (stores, device)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.roots = StoreRoots.from_settings(settings)

    def model_store(self) -> Store:
        """Models are written to the default store."""
        return self.roots.store("")

    def train(self, ctx: TaskContext) -> TaskResult:
        lease = ctx.lease
        config = _config(lease)
        member = lease.task.params.get("member", "")
        if not member:
            raise InvalidArgumentError(
                f"train task {lease.task.id!r} names no member", field="task.params.member"
            )
        store = self.model_store()
        located = located_volumes(lease, self.roots)
        last_report = [0.0]

        def observer(event: ProgressEvent) -> None:
            # Validation results always go out; loss-only updates at most once a second.
            now = time.monotonic()
            shown = "f1" in event.metrics or CANDIDATE_METRIC in event.metrics
            if shown or now - last_report[0] >= 1.0:
                last_report[0] = now
                ctx.report(dict(event.metrics), event.message)

        device = pick_device(None if self.settings.device == "auto" else self.settings.device)
        gpus = visible_gpus() if device.type == "cuda" else 0
        if config.adapting:
            result: MemberResult = adapt_member(
                config,
                member,
                store,
                roots=self.roots,
                located=located,
                observer=observer,
                cancelled=ctx.interrupted,
                device=device,
                job_id=lease.task.job_id,
            )
        elif gpus > 1:
            from deep3m.training.validate import check_training_inputs

            check_training_inputs(config, store, roots=self.roots, located=located)
            result = train_member_distributed(
                config,
                member,
                store,
                gpus,
                device_type="cuda",
                observer=observer,
                cancelled=ctx.interrupted,
                job_id=lease.task.job_id,
            )
        else:
            result = train_member(
                config,
                member,
                store,
                observer=observer,
                cancelled=ctx.interrupted,
                device=device,
                roots=self.roots,
                job_id=lease.task.job_id,
                located=located,
            )
        metrics = {
            "iterations": float(result.iterations),
            "seconds": result.seconds,
            "resumed_from": float(result.resumed_from),
        }
        metrics.update(
            {
                k: float(v)
                for k, v in result.metrics.items()
                if k in ("loss", "val_loss", "precision", "recall", "f1", "jaccard")
            }
        )
        return _task_result(
            metrics,
            {
                "weights": f"models/{config.model_id}/{result.weights}",
                "metrics": metrics_key(config.model_id, member),
                "plot": plot_key(config.model_id, member),
            },
        )

    def finalize(self, ctx: TaskContext) -> TaskResult:
        config = _config(ctx.lease)
        store = self.model_store()
        card = assemble_card(
            config,
            store,
            roots=self.roots,
            located=located_volumes(ctx.lease, self.roots),
            device=pick_device(None if self.settings.device == "auto" else self.settings.device),
        )
        return _task_result(card.metrics, {"model": card_key(card.id)})


def _adaptation_record(
    config: TrainConfig, docs: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The card's ``adaptation``: the job's method and target, the first member's reference
    statistics and prediction-time histogram, and each member's chosen checkpoint."""
    if not config.adapting:
        return {}
    first = dict(docs[config.members[0]].get("adaptation", {}))
    per_member = {
        m: {k: docs[m].get("adaptation", {}).get(k) for k in CHOSEN_FIELDS} for m in config.members
    }
    fallbacks = [f"{m}: {r['fallback']}" for m, r in per_member.items() if r.get("fallback")]
    return {
        "method": config.adaptation,
        "target": config.adapt_to.describe() if config.adapt_to else "",
        "select_by": config.select_by,
        "target_histogram": first.get("target_histogram"),
        "reference_morphology": first.get("reference_morphology"),
        "training_histogram": first.get("training_histogram"),
        "match_histogram_at_predict": config.match_histogram_at_predict,
        "members": per_member,
        "fallback": "; ".join(fallbacks) or None,
    }


def _validation_volume(
    config: TrainConfig,
    store: Store,
    norm: Normalization,
    roots: StoreRoots | None,
    located: LocatedVolumes | None = None,
) -> LabelledVolume:
    img_src, img_field = (
        (config.validation_images, "validation_images")
        if config.validation_images
        else (config.images, "images")
    )
    lbl_src, lbl_field = (
        (config.validation_labels, "validation_labels")
        if config.validation_labels
        else (config.labels, "labels")
    )
    s, key = resolve_source(img_src, store, roots, field=img_field, located=located)
    images = norm.apply(read_volume(s, key, img_src.array, what=img_field))
    s, key = resolve_source(lbl_src, store, roots, field=lbl_field, located=located)
    labels = to_classes(
        read_volume(s, key, lbl_src.array, what=lbl_field),
        config.num_classes,
        where=lbl_src.describe(),
    )
    return LabelledVolume(images, labels, img_src.describe())


def assemble_card(
    config: TrainConfig,
    store: Store,
    *,
    roots: StoreRoots | None = None,
    device: torch.device | None = None,
    score: bool = True,
    located: LocatedVolumes | None = None,
) -> ModelCard:
    """Write ``models/<id>/model.json`` for a job whose members have all finished."""
    docs: dict[str, dict[str, Any]] = {}
    for member in config.members:
        doc = completed_member(store, config, member)
        if doc is None:
            raise FailedPreconditionError(
                f"member {member!r} of model {config.model_id!r} has not finished training "
                f"(no complete {metrics_key(config.model_id, member)})",
                field="members",
            )
        docs[member] = doc
    first = docs[config.members[0]]
    norm = Normalization(
        float(first["normalization"]["mean"]), float(first["normalization"]["std"])
    )
    base_iterations = 0
    if config.base_model:
        base_iterations = load_card(store, config.base_model).iterations
    members = tuple(
        MemberCard(
            name=m,
            frames=config.frames(m),
            weights=str(docs[m]["weights"]),
            iterations=base_iterations + int(docs[m].get("iteration", docs[m]["iterations"])),
            metrics={k: float(v) for k, v in docs[m].get("final", {}).items()},
        )
        for m in config.members
    )
    metrics: dict[str, float] = {}
    threshold = 0.5
    if score:
        dev = device or torch.device("cpu")
        nets = []
        for m in members:
            net = build_network(
                config.network_architecture,
                frames=m.frames,
                width=config.width,
                num_classes=config.num_classes,
                input_scale=config.input_scale,
            )
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(store.read_bytes(f"models/{config.model_id}/{m.weights}"))
            net.load_state_dict(state, strict=True)
            nets.append((net.to(dev).eval(), m.frames))
        volume = _validation_volume(config, store, norm, roots, located)
        metrics = {f"ensemble_{k}": v for k, v in evaluate_ensemble(nets, volume, dev).items()}
        probs = [foreground_probabilities([(n, f, 1.0)], volume, dev) for n, f in nets]
        chosen = select_ensemble(probs, volume.labels > 0)
        # An adapted model keeps the threshold its checkpoint was chosen at: the
        # source's best threshold says little about the target.
        threshold = 0.5 if config.adapting else chosen.threshold
        metrics["selected_f1"] = chosen.f1
        metrics["selected_threshold"] = chosen.threshold
        members = tuple(
            m.model_copy(update={"weight": w}) for m, w in zip(members, chosen.weights, strict=True)
        )
    voxel = first.get("voxel_size_nm") or [1.0, 1.0, 1.0]
    max_frames = max(m.frames for m in members)
    halo_yx = seamless_halo_yx(config.network_architecture, config.input_scale)
    card = ModelCard(
        id=config.model_id,
        architecture=config.network_architecture,  # type: ignore[arg-type]
        width=config.width,
        num_classes=config.num_classes,
        members=members,
        normalization_mean=norm.mean,
        normalization_std=norm.std,
        voxel_size_nm=(float(voxel[0]), float(voxel[1]), float(voxel[2])),
        # The receptive field's reach: block predictions then equal a whole-volume pass.
        halo=(max_frames // 2, halo_yx, halo_yx),
        input_multiple=INPUT_MULTIPLE,
        input_scale=config.input_scale,
        threshold=threshold,
        iterations=max(m.iterations for m in members),
        base_model=config.base_model,
        training={
            "images": config.images.describe(),
            "labels": config.labels.describe(),
            "validation_images": config.validation_images.describe()
            if config.validation_images
            else "",
            "validation_labels": config.validation_labels.describe()
            if config.validation_labels
            else "",
            "validation_source": str(first.get("validation_source", "")),
            "recipe": config.recipe,
            "architecture": config.architecture,
            "optimizer": config.optimizer,
            "learning_rate": config.base_learning_rate,
            "lr_policy": config.schedule
            + (f" (power {config.lr_power})" if config.schedule == "poly" else ""),
            "schedule": config.schedule,
            "loss": config.loss,
            "class_balance": config.class_balance,
            "foreground_fraction": config.foreground_fraction,
            "input_scale": config.input_scale,
            "cpu_bfloat16": config.cpu_bfloat16,
            "channels_last": config.channels_last,
            "keep_best": config.keep_best,
            "max_minutes": config.max_minutes,
            "momentum": config.momentum,
            "weight_decay": config.weight_decay,
            "batch_size": config.batch_size,
            "patch_shape": list(config.patch_shape),
            "accumulate_gradients": config.accumulate_gradients,
            "intensity_augmentations": list(config.intensity_augmentations),
            "class_weights": first.get("class_weights", []),
            "iterations": config.total_iterations,
            "seed": config.seed,
            "adapt_to": config.adapt_to.describe() if config.adapt_to else "",
            "adaptation": config.adaptation,
            "select_by": config.select_by,
        },
        metrics=metrics,
        adaptation=_adaptation_record(config, docs),
    )
    save_card(store, card)
    return card
