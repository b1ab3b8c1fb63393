"""Score networks on whole labelled slices: loss, pixel accuracy, P/R/F1/Jaccard.

Every slice of the validation volume is predicted whole (its frames mirrored at
the volume's ends, y/x mirror-padded to the network's input multiple and cropped
back), a few slices at a time, and scored as it goes, so memory stays at a few
slices. Precision, recall, F1 and Jaccard are for foreground (any class but 0)
against background, summed over slices with ``deep3m.core.metrics``. An
ensemble is scored on its members' averaged probabilities (CDeep3M's merge).

Model selection on validation: ``best_threshold`` picks the probability threshold
with the best F1, and ``select_ensemble`` the members (and threshold) whose average
scores best, so an ensemble never scores below its best member.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deep3m.core.metrics import ConfusionCounts, confusion_counts
from deep3m.models.registry import INPUT_MULTIPLE
from deep3m.training.data import LabelledVolume, pad_to_multiple, slice_stack


def predict_slices(
    net: nn.Module, images: np.ndarray, frames: int, device: torch.device, zs: Sequence[int]
) -> np.ndarray:
    """Class probabilities (len(zs), classes, Y, X) float32 for slices ``zs``."""
    stacks = np.stack([slice_stack(images, z, frames) for z in zs])
    padded, (h, w) = pad_to_multiple(stacks, INPUT_MULTIPLE)
    x = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32)).to(device)
    with torch.no_grad():
        probs = torch.softmax(net(x).float(), dim=1)[:, :, :h, :w]
    return probs.cpu().numpy()  # type: ignore[no-any-return]


def _ensemble_batches(
    members: Sequence[tuple[nn.Module, int]], images: np.ndarray, device: torch.device, batch: int
) -> Iterator[tuple[range, np.ndarray]]:
    depth = images.shape[0]
    for start in range(0, depth, batch):
        zs = range(start, min(start + batch, depth))
        total = None
        for net, frames in members:
            probs = predict_slices(net, images, frames, device, zs)
            total = probs if total is None else total + probs
        assert total is not None  # members is non-empty (checked by the caller)
        yield zs, total / len(members)


def evaluate_ensemble(
    members: Sequence[tuple[nn.Module, int]],
    volume: LabelledVolume,
    device: torch.device,
    *,
    batch: int = 2,
) -> dict[str, float]:
    """Validation metrics of (network, frames) members averaged; networks left as found."""
    if not members:
        return {}
    modes = [net.training for net, _ in members]
    for net, _ in members:
        net.eval()
    loss_sum = 0.0
    correct = 0
    counts = ConfusionCounts()
    try:
        for zs, probs in _ensemble_batches(members, volume.images, device, batch):
            labels = volume.labels[zs.start : zs.stop]
            p = torch.from_numpy(probs).clamp_min(1e-7)
            loss_sum += float(
                F.nll_loss(torch.log(p), torch.from_numpy(labels), reduction="sum").item()
            )
            predicted = probs.argmax(axis=1)
            correct += int((predicted == labels).sum())
            counts = counts + confusion_counts(predicted > 0, labels > 0)
    finally:
        for (net, _), mode in zip(members, modes, strict=True):
            net.train(mode)
    n = int(volume.labels.size)
    return {
        "val_loss": loss_sum / n,
        "accuracy": correct / n,
        "precision": counts.precision,
        "recall": counts.recall,
        "f1": counts.f1,
        "jaccard": counts.jaccard,
    }


def evaluate(
    net: nn.Module, volume: LabelledVolume, frames: int, device: torch.device, *, batch: int = 2
) -> dict[str, float]:
    return evaluate_ensemble([(net, frames)], volume, device, batch=batch)


def foreground_probabilities(
    members: Sequence[tuple[nn.Module, int, float]],
    volume: LabelledVolume,
    device: torch.device,
    *,
    batch: int = 2,
) -> np.ndarray:
    """P(foreground) (Z, Y, X) float32: the members' probabilities, weighted and averaged."""
    total_weight = sum(w for _, _, w in members)
    if not members or total_weight <= 0:
        raise ValueError("at least one member with a positive weight is needed")
    depth = volume.images.shape[0]
    out = np.zeros(volume.labels.shape, np.float32)
    modes = [net.training for net, _, _ in members]
    for net, _, _ in members:
        net.eval()
    try:
        for start in range(0, depth, batch):
            zs = range(start, min(start + batch, depth))
            for net, frames, weight in members:
                if weight <= 0:
                    continue
                probs = predict_slices(net, volume.images, frames, device, zs)
                out[zs.start : zs.stop] += weight * (1.0 - probs[:, 0])
    finally:
        for (net, _, _), mode in zip(members, modes, strict=True):
            net.train(mode)
    return out / np.float32(total_weight)


THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(2, 19))


def best_threshold(
    probabilities: np.ndarray, ground_truth: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> tuple[float, float]:
    """The threshold (of ``thresholds``) with the best voxel F1, and that F1.

    Ties go to the threshold nearest 0.5, so a flat curve keeps the usual default.
    """
    gt = np.asarray(ground_truth, dtype=bool)
    # A histogram of the probabilities per class gives every threshold's counts at once.
    bins = np.linspace(0.0, 1.0, 1001)
    fg_hist = np.histogram(probabilities[gt], bins=bins)[0][::-1].cumsum()[::-1]
    bg_hist = np.histogram(probabilities[~gt], bins=bins)[0][::-1].cumsum()[::-1]
    positives = int(gt.sum())
    best = (0.5, -1.0)
    for t in sorted(thresholds, key=lambda t: abs(t - 0.5)):
        i = round(t * 1000)
        tp, fp = int(fg_hist[i]), int(bg_hist[i])
        fn = positives - tp
        denom = 2 * tp + fp + fn
        f1 = 2 * tp / denom if denom else 0.0
        if f1 > best[1] + 1e-12:
            best = (float(t), f1)
    return best


@dataclass(frozen=True)
class Selection:
    """Ensemble weights and threshold chosen on validation, with the F1 they reach."""

    weights: tuple[float, ...]
    threshold: float
    f1: float
    member_f1: tuple[float, ...]


def select_ensemble(
    member_probabilities: Sequence[np.ndarray], ground_truth: np.ndarray
) -> Selection:
    """The subset of members (equal weights) and threshold with the best validation F1.

    Every non-empty subset is tried, singletons included, so the chosen ensemble never
    scores below its best member on these slices; ties keep more members.
    """
    n = len(member_probabilities)
    if not n:
        raise ValueError("no members to select from")
    singles = tuple(best_threshold(p, ground_truth)[1] for p in member_probabilities)
    best: tuple[float, int, tuple[float, ...], float] | None = None
    for subset in itertools.product((0.0, 1.0), repeat=n):
        if not any(subset):
            continue
        avg = sum(w * p for w, p in zip(subset, member_probabilities, strict=True))
        threshold, f1 = best_threshold(np.asarray(avg) / sum(subset), ground_truth)
        count = int(sum(subset))
        if best is None or f1 > best[0] + 1e-9 or (abs(f1 - best[0]) <= 1e-9 and count > best[1]):
            best = (f1, count, subset, threshold)
    assert best is not None  # n >= 1
    return Selection(best[2], best[3], best[0], singles)
