"""One precision rule for every training path (supervised members and adaptation):
float16 autocast with a gradient scaler on CUDA when ``mixed_precision``; bfloat16
autocast on the CPU when ``cpu_bfloat16`` (the CPUs it targets have AVX-512 BF16);
float32 otherwise."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def precision_for(device: torch.device, *, mixed_precision: bool, cpu_bfloat16: bool) -> str:
    """ "float16", "bfloat16" or "float32" for training on ``device``."""
    if device.type == "cuda" and mixed_precision:
        return "float16"
    if device.type == "cpu" and cpu_bfloat16:
        return "bfloat16"
    return "float32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of ``precision`` on ``device`` (none for float32)."""
    if precision == "float16":
        return torch.autocast(device.type, dtype=torch.float16)
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
