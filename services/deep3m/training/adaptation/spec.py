"""What an adaptation run is asked for: the method, the checkpoint selector, the
network and the budgets, checked when built."""

from __future__ import annotations

from dataclasses import dataclass, field

from deep3m.adaptation.options import ADAPTATIONS
from deep3m.core.errors import InvalidArgumentError
from deep3m.models.recipes import ADAPTATION_ARCHITECTURE
from deep3m.models.registry import INPUT_MULTIPLE, check_architecture
from deep3m.models.translation import TranslationConfig
from deep3m.training.adaptation.candidates import check_selector

# The label-free methods (what a training job offers), then those using target labels.
LABEL_FREE: tuple[str, ...] = ADAPTATIONS
METHODS: tuple[str, ...] = (*LABEL_FREE, "fewlabel", "supervised")
NEEDS_TARGET_LABELS: tuple[str, ...] = ("fewlabel", "supervised")


@dataclass(frozen=True)
class AdaptationSpec:
    method: str = "none"
    select_by: str = "solidity"
    architecture: str = ADAPTATION_ARCHITECTURE
    width: float = 0.125
    frames: int = 1
    iterations: int = 200
    unsupervised_iterations: int = 200
    batch: int = 4
    patch: int = 128
    lr: float = 1e-3
    checkpoints: int = 5
    histogram_p: float = 0.5
    predict_histogram: bool = False
    seed: int = 0
    ynet_width: float = 0.5
    ynet_dropout: bool = True
    fewlabel_fraction: float = 0.1
    translation: TranslationConfig = field(default_factory=TranslationConfig.cpu)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgumentError(
                f"unknown adaptation {self.method!r}; choose one of {', '.join(METHODS)}",
                field="adaptation",
            )
        check_selector(self.select_by)
        check_architecture(self.architecture)
        for name in ("iterations", "unsupervised_iterations", "batch", "checkpoints"):
            if int(getattr(self, name)) < 1:
                raise InvalidArgumentError(
                    f"{name} must be >= 1, got {getattr(self, name)!r}", field=name
                )
        if self.patch < INPUT_MULTIPLE or self.patch % INPUT_MULTIPLE:
            raise InvalidArgumentError(
                f"patch must be a positive multiple of {INPUT_MULTIPLE}, got {self.patch}",
                field="patch",
            )
        if not 0.0 <= self.histogram_p <= 1.0:
            raise InvalidArgumentError(
                f"histogram_p must be in [0, 1], got {self.histogram_p!r}", field="histogram_p"
            )
        if not 0.0 < self.fewlabel_fraction <= 1.0:
            raise InvalidArgumentError(
                f"fewlabel_fraction must be in (0, 1], got {self.fewlabel_fraction!r}",
                field="fewlabel_fraction",
            )
        if self.method == "multitask" and self.frames != 1:
            raise InvalidArgumentError(
                "the multi-task Y-Net is a 2D network: frames must be 1", field="frames"
            )
