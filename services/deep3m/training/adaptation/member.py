"""One ensemble member of a training job trained by a domain-adaptation method.

The training task's path when the job names a target volume (``adapt_to``):
the labelled source (the job's images and labels) and the unlabelled target are
read whole, :func:`deep3m.training.adaptation.methods.adapt` trains the method
and keeps the checkpoint ``select_by`` chooses, and the member's weights and
metrics document are written where the trainer writes them, so the finalize
task assembles the model card as for any member. The metrics document carries
every candidate checkpoint's figures and the adaptation record the card keeps.

Each stage's result, and each scored candidate, is kept as it ends in the member's
``adaptation/`` folder (:mod:`journal`): a task leased again after its worker was
lost continues after the last of them; ``resumed_from`` counts the iterations taken
over and ``resumed`` names the stages and candidates.

The networks see grey levels / 255 (the normalisation the card records:
mean 0, std 255); the multi-task method's Y-Net is saved as the registry's
``ynet`` segmenter.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from deep3m.adaptation.histogram import HistogramReference, pooled_reference, reference_histogram
from deep3m.core.errors import CancelledError, InvalidArgumentError
from deep3m.core.events import ProgressEvent
from deep3m.core.grey_levels import recorded_levels
from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store
from deep3m.models.card import save_weights
from deep3m.models.registry import INPUT_MULTIPLE
from deep3m.models.translation import GENERATOR_MULTIPLE, TranslationConfig
from deep3m.runtime.task import StopFlag
from deep3m.training.adaptation.candidates import Candidate
from deep3m.training.adaptation.data import SCALE, Domain
from deep3m.training.adaptation.journal import StageJournal
from deep3m.training.adaptation.methods import AdaptationSpec, adapt
from deep3m.training.adaptation.runtime import (
    PROGRESS_SECONDS,
    StageProgress,
    StageRuntime,
    use,
)
from deep3m.training.config import TrainConfig, VolumeSource
from deep3m.training.data import Normalization, read_volume, to_classes
from deep3m.training.outputs import completed_member, member_dir, result_from_store
from deep3m.training.precision import precision_for
from deep3m.training.trainer import MemberResult, Observer, metrics_key, pick_device
from deep3m.training.validate import LocatedVolumes, resolve_source

# Candidate and summary events carry this metric: an observer that thins loss-only
# updates passes them (as it passes validation results).
CANDIDATE_METRIC = "candidate_iteration"
# What the networks of every method see: grey levels / 255.
NORMALIZATION = Normalization(0.0, SCALE)


def _grey_levels(store: Store, key: str, src: VolumeSource, what: str) -> np.ndarray:
    arr = read_volume(store, key, src.array, what=what)
    if arr.dtype != np.uint8:
        raise InvalidArgumentError(
            f"adaptation matches 8-bit grey levels: {what} {src.describe()} holds {arr.dtype}",
            field=what,
        )
    if arr.ndim != 3 or 0 in arr.shape:
        raise InvalidArgumentError(
            f"{what} {src.describe()} must be a non-empty (z, y, x) stack, got shape "
            f"{list(arr.shape)}",
            field=what,
        )
    return arr


def _labelled(
    config: TrainConfig,
    store: Store,
    roots: StoreRoots | None,
    located: LocatedVolumes | None,
    images: VolumeSource,
    labels: VolumeSource,
    fields: tuple[str, str],
) -> tuple[np.ndarray, np.ndarray]:
    s, key = resolve_source(images, store, roots, field=fields[0], located=located)
    raw = _grey_levels(s, key, images, fields[0])
    s, key = resolve_source(labels, store, roots, field=fields[1], located=located)
    classes = to_classes(
        read_volume(s, key, labels.array, what=fields[1]),
        config.num_classes,
        where=labels.describe(),
    )
    return raw, classes > 0


def spec_for(config: TrainConfig, member: str, smallest_yx: int) -> AdaptationSpec:
    """The adaptation procedure's settings from the job's configuration.

    The translator is the CPU-sized CUT (``TranslationConfig.cpu``), its patches
    clipped to the smallest slice; a GPU run would use ``TranslationConfig.paper``'s
    numbers with the same code.
    """
    iterations = config.total_iterations
    fit = (smallest_yx // INPUT_MULTIPLE) * INPUT_MULTIPLE
    translation = TranslationConfig.cpu()
    translation = dataclasses.replace(
        translation,
        patch=min(translation.patch, (smallest_yx // GENERATOR_MULTIPLE) * GENERATOR_MULTIPLE),
    )
    return AdaptationSpec(
        method=config.adaptation,
        select_by=config.select_by,
        architecture=config.architecture,
        width=config.width,
        frames=config.frames(member),
        iterations=iterations,
        unsupervised_iterations=config.adaptation_iterations or iterations,
        batch=config.batch_size,
        patch=min(min(config.patch_shape), fit),
        lr=config.base_learning_rate,
        checkpoints=min(config.adaptation_checkpoints, iterations),
        predict_histogram=config.match_histogram_at_predict,
        seed=config.seed,
        ynet_width=config.width,
        translation=translation,
    )


def _target(
    config: TrainConfig, store: Store, roots: StoreRoots | None, located: LocatedVolumes | None
) -> tuple[VolumeSource, np.ndarray, HistogramReference]:
    """The target's grey levels and pooled histogram: the histogram from the counts its
    writer recorded when there are any (and an all-zero target refused by them),
    else from the images read."""
    src = config.adapt_to
    if src is None:
        raise InvalidArgumentError("no target volume to adapt to", field="adapt_to")
    s, key = resolve_source(src, store, roots, field="adapt_to", located=located)
    try:
        recorded = recorded_levels(s.volume_info(key, src.array).attributes, src.array)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(
            f"adapt_to {src.describe()}: {exc.message}", field="adapt_to"
        ) from exc
    only_zeros = InvalidArgumentError(
        f"adapt_to {src.describe()} holds only zeros (padding): nothing to adapt to",
        field="adapt_to",
    )
    if recorded is not None and not recorded.any_nonzero:
        raise only_zeros  # known without reading it
    images = _grey_levels(s, key, src, "adapt_to")
    if recorded is None and not images.any():
        raise only_zeros
    if recorded is None or recorded.counts is None:
        return src, images, reference_histogram(images)
    return src, images, pooled_reference(recorded.counts, images.shape[0], field="adapt_to")


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def adapt_member(
    config: TrainConfig,
    member: str,
    store: Store,
    *,
    roots: StoreRoots | None = None,
    located: LocatedVolumes | None = None,
    observer: Observer | None = None,
    cancelled: StopFlag | None = None,
    device: torch.device | str | None = None,
    job_id: str = "",
    progress_seconds: float | None = None,
) -> MemberResult:
    """Train ``member`` by ``config.adaptation`` for ``config.adapt_to`` and write its
    weights and metrics.

    Volumes in ``located`` (by field: ``images``, ``labels``, ``validation_*``,
    ``adapt_to``) are read where the scheduler resolved them at submission; the
    others are resolved here (checked against ``roots`` when given). Runs on
    ``device`` (``pick_device``'s choice when None or "auto") under the supervised
    trainer's precision rule. ``observer`` sees every stage's loss every few
    seconds (``progress_seconds``) and each scored candidate; ``cancelled`` stops
    the run within one iteration of any stage, or one predicted batch of a
    candidate's scoring (CancelledError; what finished before is kept to resume from).
    """
    dev = pick_device(device)

    def report(metrics: Mapping[str, float], message: str) -> None:
        if observer is not None:
            observer(ProgressEvent(job_id=job_id or config.model_id, state="RUNNING",
                                   stage="train", task_id=member, message=message,
                                   metrics=dict(metrics)))  # fmt: skip

    def on_progress(p: StageProgress) -> None:
        report(
            {"iteration": float(p.iteration), "iterations": float(p.iterations), "loss": p.loss,
             "stage_seconds": p.seconds},
            f"{member}: {p.stage} iteration {p.iteration}/{p.iterations}, loss {p.loss:.4f}",
        )  # fmt: skip

    runtime = StageRuntime(
        device=dev,
        precision=precision_for(
            dev, mixed_precision=config.mixed_precision, cpu_bfloat16=config.cpu_bfloat16
        ),
        on_progress=on_progress,
        cancelled=cancelled,
        progress_seconds=PROGRESS_SECONDS if progress_seconds is None else progress_seconds,
    )
    started = time.monotonic()
    finished = completed_member(store, config, member)
    if finished is not None:  # leased again after it was written: nothing left to do
        report({}, f"{member}: already trained")
        return result_from_store(store, config, member, finished)
    target_src, target_images, target_hist = _target(config, store, roots, located)
    images, labels = _labelled(config, store, roots, located, config.images, config.labels,
                               ("images", "labels"))  # fmt: skip
    source = Domain.of("source", images, labels)
    target_domain = Domain.of("target", target_images)
    if config.validation_images is not None and config.validation_labels is not None:
        v_images, v_labels = _labelled(
            config,
            store,
            roots,
            located,
            config.validation_images,
            config.validation_labels,
            ("validation_images", "validation_labels"),
        )
        validation, validation_source = Domain.of("validation", v_images, v_labels), "validation"
    else:
        validation, validation_source = source, "training"
    spec = spec_for(config, member, min(source.min_size(), target_domain.min_size()))
    report({}, f"{member}: {spec.method} adaptation to {target_src.describe()} on {dev.type}")

    def on_candidate(cand: Candidate) -> None:
        if cancelled is not None and cancelled.is_set():
            raise CancelledError(f"training of {member!r} cancelled at {cand.name}")
        figures = {CANDIDATE_METRIC: float(cand.iteration), **_finite(cand.figures())}
        report(figures, f"{member}: candidate {cand.name}")

    journal = StageJournal(
        store,
        f"{member_dir(config.model_id, member)}/adaptation",
        {"config": config.fingerprint(member), "spec": dataclasses.asdict(spec)},
    )
    with use(runtime):
        result = adapt(
            spec,
            source,
            target_domain,
            source_validation=validation,
            on_candidate=on_candidate,
            target_histogram=target_hist,
            journal=journal,
        )

    state = {k: v.detach().cpu() for k, v in result.net.state_dict().items()}
    if config.network_architecture == "ynet":
        state = {f"ynet.{k}": v for k, v in state.items()}  # YNetSegmenter's layout
    weights = save_weights(store, config.model_id, member, state)
    chosen = result.chosen.figures()
    record = {
        **result.card["adaptation"],
        "target": target_src.describe(),
        "target_histogram": target_hist.to_dict(),
        "chosen_figures": chosen,
        "choice": result.metrics["choice"],
    }
    final = _finite(
        {
            "source_validation_iou": chosen["source_validation_iou"],
            "target_solidity": chosen["target_solidity"],
            "target_relative_area": chosen["target_relative_area"],
            "target_regions": chosen["target_regions"],
        }
    )
    doc = {
        "member": member,
        "frames": config.frames(member),
        "iteration": spec.iterations,
        "iterations": config.total_iterations,
        "complete": True,
        "weights": weights,
        "final": final,
        "history": [],
        "normalization": {"mean": NORMALIZATION.mean, "std": NORMALIZATION.std},
        "class_weights": [],
        "validation_source": validation_source,
        "voxel_size_nm": list(
            config.voxel_size_nm or _voxels(store, roots, located, config.images)
        ),
        "fingerprint": config.fingerprint(member),
        "resumed_from": result.resumed["iterations"],
        "resumed": result.resumed,
        "device": dev.type,
        "precision": runtime.precision,
        "adaptation": record,
        # Every candidate checkpoint's figures, every selector's pick, the stages.
        "adaptation_metrics": result.metrics,
    }
    store.write_json(metrics_key(config.model_id, member), doc)
    fallback = record.get("fallback")
    report(
        {CANDIDATE_METRIC: float(result.chosen.iteration), **final},
        f"{member}: kept {result.chosen.name}" + (f" ({fallback})" if fallback else ""),
    )
    return MemberResult(
        member=member,
        frames=config.frames(member),
        iterations=spec.iterations,
        weights=weights,
        metrics=final,
        history=(),
        normalization=NORMALIZATION,
        resumed_from=result.resumed["iterations"],
        seconds=time.monotonic() - started,
        state_dict=dict[str, torch.Tensor](state),
    )


def _voxels(
    store: Store, roots: StoreRoots | None, located: LocatedVolumes | None, src: VolumeSource
) -> tuple[float, ...]:
    if located is not None and "images" in located:
        return tuple(float(v) for v in located["images"].info.voxel_size_nm)
    s, key = resolve_source(src, store, roots, field="images")
    return tuple(float(v) for v in s.volume_info(key, src.array).voxel_size_nm)
