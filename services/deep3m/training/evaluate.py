"""Score networks on whole labelled slices: loss, pixel accuracy, P/R/F1/Jaccard.

Every slice of the validation volume is predicted whole (its frames mirrored at
the volume's ends, y/x mirror-padded to the network's input multiple and cropped
back), a few slices at a time, and scored as it goes, so memory stays at a few
slices. Precision, recall, F1 and Jaccard are for foreground (any class but 0)
against background, summed over slices with ``deep3m.core.metrics``. An
ensemble is scored on its members' averaged probabilities (CDeep3M's merge).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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
