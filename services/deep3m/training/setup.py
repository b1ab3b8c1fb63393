"""What a member's run starts from: the device, the training set, the network, the optimiser.

The training set is read once: images normalised (with the base model's
normalisation when fine-tuning, since its weights expect it), labels as class
indices, the validation volume (or the training one when none is given:
``validation_source`` says which), class weights and the voxel size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store
from deep3m.models.card import load_state_dict
from deep3m.models.registry import build_network
from deep3m.training.config import TrainConfig
from deep3m.training.data import (
    LabelledVolume,
    Normalization,
    class_weights,
    compute_normalization,
    read_volume,
    to_classes,
)
from deep3m.training.objectives import training_loss
from deep3m.training.validate import CheckedInputs, LocatedVolumes, resolve_source


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
    config: TrainConfig,
    store: Store,
    checked: CheckedInputs,
    *,
    roots: StoreRoots | None = None,
    located: LocatedVolumes | None = None,
) -> TrainingSet:
    s, key = resolve_source(config.images, store, roots, field="images", located=located)
    raw_images = read_volume(s, key, config.images.array, what="images")
    s, key = resolve_source(config.labels, store, roots, field="labels", located=located)
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
        s, key = resolve_source(
            config.validation_images, store, roots, field="validation_images", located=located
        )
        val_raw = read_volume(s, key, config.validation_images.array, what="validation_images")
        s, key = resolve_source(
            config.validation_labels, store, roots, field="validation_labels", located=located
        )
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
