"""Training recipes: named sets of training defaults, shared by training and scheduling.

A recipe fills every training field the caller does not give. ``cdeep3m`` is
CDeep3M's published recipe (DeepEM3D at full width, three members, Caffe's SGD
solver with the poly policy; see ``deep3m.training.config``); ``default`` is the
recipe that won the accuracy benchmark (``python -m bench accuracy``;
docs/ACCURACY.md has the table and the reasons). Plain data, so that the scheduler
can name a recipe's architecture and members at submission without importing the
training role.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CDEEP3M_MEMBERS = ("1fm", "3fm", "5fm")
CDEEP3M_ITERATIONS = 30000
DEFAULT_RECIPE = "default"
# The segmenter the label-free adaptation procedures train unless told otherwise: the
# network their benchmark measured (``python -m bench adaptation``).
ADAPTATION_ARCHITECTURE = "resunet2d"

RECIPES: dict[str, Mapping[str, Any]] = {
    "cdeep3m": {
        "architecture": "deepem3d",
        "width": 1.0,
        "members": CDEEP3M_MEMBERS,
        "iterations": CDEEP3M_ITERATIONS,
        "batch_size": 4,
        "patch_shape": (320, 320),
        "accumulate_gradients": 8,
        "validate_every": 500,
        "optimizer": "sgd",
        "learning_rate": 0.0,
        "weight_decay": 5e-4,
        "schedule": "poly",
        "loss": "ce",
        "class_balance": True,
        "foreground_fraction": 0.0,
        "input_scale": 1,
        "cpu_bfloat16": False,
        "channels_last": False,
        "keep_best": False,
    },
    "default": {
        "architecture": "unet2d",
        "width": 0.5,
        "members": CDEEP3M_MEMBERS,
        "iterations": 6000,
        "batch_size": 8,
        "patch_shape": (256, 256),
        "accumulate_gradients": 1,
        "validate_every": 500,
        "optimizer": "adam",
        "learning_rate": 2e-3,
        "weight_decay": 1e-4,
        "schedule": "onecycle",
        "loss": "ce_dice",
        "class_balance": True,
        "foreground_fraction": 0.5,
        "input_scale": 1,
        "cpu_bfloat16": True,
        "channels_last": True,
        "keep_best": True,
    },
}
RECIPE_NAMES: tuple[str, ...] = tuple(RECIPES)


def recipe_defaults(name: str) -> Mapping[str, Any]:
    """The fields recipe ``name`` sets ("" means the default recipe); KeyError if unknown."""
    return RECIPES[name or DEFAULT_RECIPE]


def recipe_architecture(name: str, *, adapting: bool) -> str:
    """The architecture recipe ``name`` trains when none is given: adaptation under the
    default recipe trains ``ADAPTATION_ARCHITECTURE``."""
    if adapting and (name or DEFAULT_RECIPE) == DEFAULT_RECIPE:
        return ADAPTATION_ARCHITECTURE
    return str(recipe_defaults(name)["architecture"])
