"""The adaptation methods as training procedures (Franco-Barranco et al. 2022).

``adapt(spec, source, target, …)`` trains a segmenter for ``target`` from the
labelled ``source`` and the target's images alone, records every checkpoint
candidate's figures and returns the one ``spec.select_by`` chooses:

- ``none``: supervised on the source (the baseline).
- ``histogram``: supervised on the source matched offline to the target's pooled
  histogram; the raw target is predicted.
- ``histogram-online``: the matching as an augmentation (each patch from the
  matched copy with probability ``histogram_p``).
- ``translation``: a CUT (or CycleGAN) translator trained on unpaired source and
  target patches; the segmenter trains on the translated source.
- ``ssl``: restoration pretext on source + target patches (MSE, Adam one-cycle,
  max lr 5e-4), then supervised fine-tuning with the encoder frozen (Adam
  one-cycle, max lr 1e-4).
- ``multitask``: the attention Y-Net in three stages: (1) α 0.98 MSE + β 0.02 BCE
  on source + target (SGD 1e-3), (2) α 1, β 0 with online histogram matching
  (Adam 2e-4), (3) α 0, β 1 on the labelled source, encoder levels and the
  reconstruction branch frozen (Adam one-cycle, max lr 2e-4), matching kept on as
  in the paper's code.
- ``fewlabel``: CDeep3M's transfer learning: a trained base model fine-tuned on a
  few labelled target slices for a tenth of the iterations (uses target labels).
- ``supervised``: trained on the labelled target slices (the upper reference).

The supervised stage has ``iterations`` for every method; unsupervised stages
(pretext, Y-Net stages 1–2, translator) have ``unsupervised_iterations`` on top.

The spec is in ``spec``; the unsupervised stages run before the supervised one
are in ``pretraining``. With a ``journal`` every finished stage and every scored
candidate is kept as it ends, and a run given the journal of an interrupted one
continues after the last of them (``metrics["resumed"]`` says what it took over).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deep3m.adaptation.histogram import HistogramReference, match_stack, reference_histogram
from deep3m.adaptation.morphology import Morphology, morphology
from deep3m.core.errors import FailedPreconditionError, InvalidArgumentError
from deep3m.models.registry import INPUT_MULTIPLE
from deep3m.models.translation import build_translator
from deep3m.models.ynet import AttentionYNet
from deep3m.training.adaptation.candidates import (
    Candidate,
    CandidateRecorder,
    choose,
    load_state,
    selections,
)
from deep3m.training.adaptation.data import Domain, PatchSampler
from deep3m.training.adaptation.journal import CandidateRecord, StageJournal
from deep3m.training.adaptation.loops import (
    Schedule,
    StageLog,
    StageResume,
    StageState,
    run_stage,
)
from deep3m.training.adaptation.networks import (
    build_segmenter,
    encoder_modules,
    segmentation_loss,
)
from deep3m.training.adaptation.pretraining import (
    SSL_FINETUNE_LR,
    YNET_LRS,
    YNET_STAGES,
    ssl_pretext,
    ynet_stage,
)
from deep3m.training.adaptation.spec import (
    LABEL_FREE,
    METHODS,
    NEEDS_TARGET_LABELS,
    AdaptationSpec,
)
from deep3m.training.adaptation.translation import train_translator, translate_stack

__all__ = [
    "LABEL_FREE",
    "METHODS",
    "NEEDS_TARGET_LABELS",
    "AdaptationResult",
    "AdaptationSpec",
    "adapt",
]


@dataclass
class AdaptationResult:
    method: str
    net: nn.Module
    chosen: Candidate
    candidates: list[Candidate]
    reference: Morphology
    stages: list[StageLog]
    metrics: dict[str, Any]
    card: dict[str, Any]
    # What was taken over from an interrupted run: stage and candidate names, iterations.
    resumed: dict[str, Any] = field(default_factory=dict)


def _uint8_levels(stacks: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    return [np.clip(np.rint(s), 0, 255).astype(np.uint8) for s in stacks]


def _check_domains(
    spec: AdaptationSpec,
    source: Domain,
    target: Domain,
    target_labelled: Domain | None,
    base_state: Mapping[str, torch.Tensor] | None,
) -> None:
    if not source.labelled:
        raise InvalidArgumentError(f"the source {source.name!r} needs labels", field="source")
    small = min(target.min_size(), source.min_size())
    if small < INPUT_MULTIPLE:
        raise InvalidArgumentError(
            f"slices must be at least {INPUT_MULTIPLE} px on a side, the smallest is {small}",
            field="target" if target.min_size() < INPUT_MULTIPLE else "source",
        )
    if spec.method in NEEDS_TARGET_LABELS and (
        target_labelled is None or not target_labelled.labelled
    ):
        raise InvalidArgumentError(
            f"{spec.method} needs labelled target slices (target_labelled)",
            field="target_labelled",
        )
    if spec.method == "fewlabel" and base_state is None:
        raise FailedPreconditionError(
            "fewlabel fine-tunes a trained base model: give its weights (base_state)",
            field="base_model",
        )


def adapt(
    spec: AdaptationSpec,
    source: Domain,
    target: Domain,
    *,
    source_validation: Domain | None = None,
    target_scoring: Domain | None = None,
    target_labelled: Domain | None = None,
    base_state: Mapping[str, torch.Tensor] | None = None,
    out_dir: Path | None = None,
    on_candidate: Callable[[Candidate], object] | None = None,
    target_histogram: HistogramReference | None = None,
    journal: StageJournal | None = None,
) -> AdaptationResult:
    """Train ``spec.method`` for ``target`` and choose a checkpoint by ``spec.select_by``.

    ``target``'s labels, if any, are never used; ``target_scoring`` (labelled)
    only scores candidates (oracle figures); ``target_labelled`` is what
    ``fewlabel``/``supervised`` train on. ``on_candidate`` sees each candidate as it
    is scored (progress; raising there stops the run). ``target_histogram`` is the
    target's pooled histogram when already known (from the counts its volume's
    writer recorded); otherwise it is pooled from ``target.images``. ``journal``
    keeps every finished stage and scored candidate; those it already holds (of
    this spec) are taken over instead of being run again.
    """
    _check_domains(spec, source, target, target_labelled, base_state)
    torch.manual_seed(spec.seed)
    reference = morphology(list(source.labels or ()), field="source.labels")
    if reference.empty:
        raise InvalidArgumentError(
            f"the source labels of {source.name!r} hold no object over 10 px: no shape prior",
            field="source.labels",
        )
    stages: list[StageLog] = []
    target_hist = (
        reference_histogram(list(target.images)) if target_histogram is None else target_histogram
    )
    train_domain = source
    alternate: list[np.ndarray] | None = None
    alternate_p = 0.0
    unsup_started = time.perf_counter()
    sup_iterations = spec.iterations
    seg_lr = spec.lr
    frozen: list[nn.Module] = []
    net: nn.Module
    resumed: dict[str, Any] = {"stages": [], "candidates": [], "iterations": 0}
    continuing = journal is not None  # until the first stage without a usable record

    def stage(
        index: int, name: str, modules: Mapping[str, nn.Module], train: Callable[[], StageLog]
    ) -> StageLog:
        nonlocal continuing
        if journal is not None and continuing:
            done = journal.load_stage(index, name, modules)
            if done is not None:
                resumed["stages"].append(name)
                resumed["iterations"] += done.iterations
                return done
            continuing = False
            journal.discard(stages_from=index)  # they followed this stage's old run
        log = train()
        if journal is not None:
            journal.save_stage(index, name, log, modules)
        return log

    if spec.method == "multitask":
        net = AttentionYNet(
            spec.ynet_width, dropout=None if not spec.ynet_dropout else (0.1, 0.1, 0.2, 0.2, 0.3)
        )
    else:
        net = build_segmenter(spec.architecture, frames=spec.frames, width=spec.width)

    if spec.method == "histogram":
        train_domain = source.with_images(
            [match_stack(s, target_hist) for s in source.images], "+hm"
        )
    elif spec.method == "histogram-online":
        alternate = [match_stack(s, target_hist) for s in source.images]
        alternate_p = spec.histogram_p
    elif spec.method == "translation":
        translator = build_translator(spec.translation)
        stages.append(
            stage(
                0,
                f"translation-{spec.translation.kind}",
                {"translator": translator},
                lambda: train_translator(
                    translator,
                    source,
                    target,
                    iterations=spec.unsupervised_iterations,
                    batch=spec.batch,
                    seed=spec.seed,
                ),
            )
        )
        train_domain = source.with_images(
            [translate_stack(translator, s) for s in source.images], "+translated"
        )
    elif spec.method == "ssl":

        def pretext(net: nn.Module = net) -> StageLog:
            return ssl_pretext(net, spec, source, target)

        stages.append(stage(0, "ssl-pretext", {"net": net}, pretext))
        frozen = encoder_modules(net)
        seg_lr = SSL_FINETUNE_LR
    elif isinstance(net, AttentionYNet):  # multitask
        matched = [match_stack(s, target_hist) for s in source.images]
        for index, name in enumerate(YNET_STAGES):

            def train_ynet(net: AttentionYNet = net, index: int = index) -> StageLog:
                return ynet_stage(net, spec, source, target, matched, index)

            stages.append(stage(index, name, {"net": net}, train_ynet))
        alternate = matched
        frozen = [*net.encoder, *net.reconstruction_modules()]
        seg_lr = YNET_LRS[2]
        alternate_p = spec.histogram_p
    elif spec.method == "fewlabel" and base_state is not None and target_labelled is not None:
        load_state(net, base_state)
        train_domain = target_labelled
        sup_iterations = max(1, round(spec.iterations * spec.fewlabel_fraction))
    elif spec.method == "supervised" and target_labelled is not None:
        train_domain = target_labelled
    unsup_seconds = time.perf_counter() - unsup_started

    training_hist = reference_histogram(_uint8_levels(train_domain.images))
    recorder = CandidateRecorder(
        net,
        target,
        source_validation=source_validation,
        target_scoring=target_scoring,
        predict_histogram=training_hist if spec.predict_histogram else None,
        out_dir=out_dir / "candidates" if out_dir is not None else None,
    )
    sampler = PatchSampler(
        train_domain,
        patch=spec.patch,
        frames=spec.frames,
        seed=spec.seed + 100,
        alternate=alternate,
        alternate_p=alternate_p,
    )

    def seg_step() -> torch.Tensor:
        x, y = sampler.labelled_sample(spec.batch)
        return segmentation_loss(net, x, y)

    every = max(1, sup_iterations // spec.checkpoints)
    resume: StageResume | None = None
    if journal is not None:
        planned = [i for i in range(1, sup_iterations + 1) if i % every == 0 or i == sup_iterations]
        records = journal.load_candidates(planned, net.state_dict()) if continuing else []
        resume = _take_over(records, recorder.candidates, net, sampler)
        if resume is not None:
            resumed["candidates"] = [r.candidate.name for r in records]
            resumed["iterations"] += resume.iteration
        journal.discard(candidates_from=resume.iteration if resume is not None else 0)

    def checkpoint(iteration: int, state: StageState) -> None:
        cand = recorder(iteration)
        if journal is not None:
            # Kept before anyone hears of it: a stop raised there loses nothing.
            journal.save_candidate(cand, state, sampler.rng.bit_generator.state)
        if on_candidate is not None:
            on_candidate(cand)

    sup_log = run_stage(
        "segmentation",
        seg_step,
        train=[net],
        frozen=frozen,
        schedule=Schedule(sup_iterations, seg_lr),
        checkpoint_every=every,
        on_checkpoint=checkpoint,
        resume=resume,
    )
    stages.append(sup_log)
    chosen, choice = choose(recorder.candidates, spec.select_by, reference)
    load_state(net, chosen.state)
    net.eval()

    metrics = {
        "method": spec.method,
        "source": source.name,
        "target": target.name,
        "select_by": spec.select_by,
        "spec": {k: v for k, v in asdict(spec).items() if k != "translation"}
        | {"translation": asdict(spec.translation)},
        "reference": reference.to_dict(),
        "candidates": [c.figures() for c in recorder.candidates],
        "selected": selections(recorder.candidates, reference),
        "chosen": chosen.name,
        "choice": choice,
        "stages": [{k: v for k, v in asdict(s).items() if k != "losses"} for s in stages],
        "resumed": resumed,
        "wall_seconds": {
            "unsupervised": unsup_seconds,
            "supervised": sup_log.seconds,
        },
    }
    card = {
        "adaptation": {
            "method": spec.method,
            "target": target.name,
            "select_by": spec.select_by,
            "chosen_checkpoint": chosen.name,
            "chosen_iteration": chosen.iteration,
            "fallback": choice.get("fallback"),
            "reference_morphology": reference.to_dict(),
            "training_histogram": training_hist.to_dict(),
            "match_histogram_at_predict": spec.predict_histogram,
        }
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return AdaptationResult(
        spec.method, net, chosen, recorder.candidates, reference, stages, metrics, card, resumed
    )


def _take_over(
    records: list[CandidateRecord],
    candidates: list[Candidate],
    net: nn.Module,
    sampler: PatchSampler,
) -> StageResume | None:
    """The supervised stage's state after the last of ``records`` (its candidates added to
    ``candidates``, its weights in ``net``, the RNGs where they were), or None."""
    if not records:
        return None
    last = records[-1]
    load_state(net, last.candidate.state)
    sampler.rng.bit_generator.state = last.sampler
    torch.set_rng_state(last.rng)
    candidates.extend(r.candidate for r in records)
    return StageResume(last.candidate.iteration, last.optimizer, last.scheduler, last.losses)
