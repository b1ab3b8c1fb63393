"""Checkpoint candidates: every candidate's figures, and the choice among them.

At each checkpoint of the supervised stage the network predicts the (unlabelled)
target images; the thresholded prediction's morphology (mean solidity, mean
relative area) is compared with the source labels'. Also recorded: the source
validation IoU, and the target IoU when target labels are given (the oracle:
benchmarks only, never used to choose). Weights are kept in memory (and, with
``out_dir``, as safetensors files) so the chosen one can be returned.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from deep3m.adaptation.histogram import HistogramReference, match_stack
from deep3m.adaptation.morphology import Morphology, morphology, select_checkpoint
from deep3m.adaptation.options import SELECT_BY
from deep3m.core.errors import InvalidArgumentError
from deep3m.core.metrics import confusion_counts
from deep3m.training.adaptation.data import Domain
from deep3m.training.adaptation.networks import predict_stack

THRESHOLD = 0.5
SELECTORS: tuple[str, ...] = SELECT_BY


def check_selector(select_by: str) -> str:
    if select_by not in SELECTORS:
        raise InvalidArgumentError(
            f"unknown checkpoint selection {select_by!r}; choose one of {', '.join(SELECTORS)}",
            field="select_by",
        )
    return select_by


def foreground_iou(prob: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float:
    counts = None
    for p, lbl in zip(prob, labels, strict=True):
        c = confusion_counts(p >= THRESHOLD, lbl)
        counts = c if counts is None else counts + c
    return 0.0 if counts is None else float(counts.jaccard)


@dataclass
class Candidate:
    name: str
    stage: str
    iteration: int
    morphology: Morphology
    source_validation_iou: float | None
    target_iou: float | None
    state: dict[str, torch.Tensor] = field(repr=False)

    def figures(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage": self.stage,
            "iteration": self.iteration,
            **{f"target_{k}": v for k, v in self.morphology.to_dict().items()},
            "source_validation_iou": self.source_validation_iou,
            "target_iou": self.target_iou,
        }


@dataclass
class CandidateRecorder:
    """Scores ``net`` at each call; ``target`` gives the images the prior looks at."""

    net: nn.Module
    target: Domain
    source_validation: Domain | None = None
    target_scoring: Domain | None = None
    predict_histogram: HistogramReference | None = None
    out_dir: Path | None = None
    stage: str = "segmentation"
    candidates: list[Candidate] = field(default_factory=list)
    on_record: Callable[[Candidate], object] | None = None

    def _view(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        # Prediction-time matching: target → the training data's histogram.
        if self.predict_histogram is None:
            return list(images)
        return [match_stack(s, self.predict_histogram) for s in images]

    def __call__(self, iteration: int) -> Candidate:
        preds = [predict_stack(self.net, s) for s in self._view(self.target.images)]
        morph = morphology([p >= THRESHOLD for p in preds], field="target")
        val = None
        if self.source_validation is not None and self.source_validation.labels is not None:
            vp = [predict_stack(self.net, s) for s in self.source_validation.images]
            val = foreground_iou(vp, self.source_validation.labels)
        tgt = None
        if self.target_scoring is not None and self.target_scoring.labels is not None:
            tp = [predict_stack(self.net, s) for s in self._view(self.target_scoring.images)]
            tgt = foreground_iou(tp, self.target_scoring.labels)
        name = f"{self.stage}-{iteration:06d}"
        # Kept on the host: candidates pile up, device memory is for training.
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}
        cand = Candidate(name, self.stage, iteration, morph, val, tgt, state)
        self.candidates.append(cand)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in state.items()},
                str(self.out_dir / f"{name}.safetensors"),
            )
        if self.on_record is not None:
            self.on_record(cand)
        return cand


def choose(
    candidates: Sequence[Candidate], select_by: str, reference: Morphology
) -> tuple[Candidate, dict[str, Any]]:
    """The candidate ``select_by`` picks, and what the choice was based on."""
    sel = check_selector(select_by)
    if not candidates:
        raise InvalidArgumentError("no checkpoint candidates were recorded", field="checkpoints")
    by_name = {c.name: c for c in candidates}
    if sel == "last":
        return candidates[-1], {"criterion": "last"}
    if sel == "validation":
        scored = [c for c in candidates if c.source_validation_iou is not None]
        if not scored:
            raise InvalidArgumentError(
                "selection by validation needs source validation images and labels",
                field="validation",
            )
        best = max(reversed(scored), key=lambda c: c.source_validation_iou or 0.0)
        return best, {
            "criterion": "validation",
            "source_validation_iou": best.source_validation_iou,
        }
    s = select_checkpoint([(c.name, c.morphology) for c in candidates], reference, sel)
    return by_name[s.chosen], s.to_dict()


def oracle(candidates: Sequence[Candidate]) -> Candidate | None:
    """The candidate with the best target IoU (needs target labels; benchmarks only)."""
    scored = [c for c in candidates if c.target_iou is not None]
    if not scored:
        return None
    return max(reversed(scored), key=lambda c: c.target_iou or 0.0)


def selections(candidates: Sequence[Candidate], reference: Morphology) -> dict[str, dict[str, Any]]:
    """Every selector's pick (and the oracle's), with the target IoU it lands on."""
    out: dict[str, dict[str, Any]] = {}
    for sel in SELECTORS:
        try:
            cand, info = choose(candidates, sel, reference)
        except InvalidArgumentError as exc:
            out[sel] = {"chosen": None, "error": exc.message}
            continue
        out[sel] = {"chosen": cand.name, "target_iou": cand.target_iou, **info}
    best = oracle(candidates)
    if best is not None:
        out["oracle"] = {"chosen": best.name, "target_iou": best.target_iou}
    return out


def load_state(net: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    net.load_state_dict(copy.deepcopy(dict(state)))
    return net
