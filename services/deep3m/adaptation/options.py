"""The adaptation options of a training job, and how they must agree.

Shared by the training configuration and the scheduler's submission check, so
both refuse the same things with the same words (plain Python: the scheduler
has no torch).
"""

from __future__ import annotations

# Label-free methods (deep3m.training.adaptation.methods.LABEL_FREE) and checkpoint
# choices. Few-label fine-tuning is a plain training from a base model.
ADAPTATIONS: tuple[str, ...] = (
    "none",
    "histogram",
    "histogram-online",
    "translation",
    "ssl",
    "multitask",
)
SELECT_BY: tuple[str, ...] = ("validation", "solidity", "area", "last")


def adaptation_problem(
    adaptation: str,
    select_by: str,
    *,
    adapt_to: bool,
    members: tuple[str, ...],
    input_scale: int,
    base_model: bool,
    num_classes: int = 2,
) -> tuple[str, str] | None:
    """``(field, message)`` of the first inconsistency among the adaptation options."""
    if adaptation not in ADAPTATIONS:
        return "adaptation", (
            f"unknown adaptation {adaptation[:64]!r}; choose one of {', '.join(ADAPTATIONS)}"
        )
    if select_by not in SELECT_BY:
        return "select_by", (
            f"unknown checkpoint selection {select_by[:64]!r}; choose one of {', '.join(SELECT_BY)}"
        )
    if not adapt_to:
        if adaptation != "none":
            return "adapt_to", f"adaptation {adaptation!r} needs a target volume (adapt_to)"
        if select_by in ("solidity", "area"):
            return "select_by", (
                f"select_by {select_by!r} compares predictions on the target volume: give adapt_to"
            )
        return None
    if num_classes != 2:
        return "num_classes", (
            f"adaptation segments one foreground class: num_classes must be 2, got {num_classes}"
        )
    if input_scale != 1:
        return "input_scale", (
            f"adaptation trains at full resolution: input_scale must be 1, got {input_scale}"
        )
    if adaptation == "multitask" and any(m != "1fm" for m in members):
        return "members", (
            f"the multi-task Y-Net is a 2D network: train member 1fm only, got {list(members)}"
        )
    if base_model:
        return "base_model", (
            "adaptation trains from scratch on the source labels; fine-tuning a base model "
            "on a few labelled target slices is a plain training with base_model"
        )
    return None
