"""The demo's data and training recipe.

``sample_paths()`` prefers the full CDeep3M mitochondria set in
``<repo>/../shared/data/cdeep3m-mito`` and falls back to the cropped sample shipped
in ``deep3m/data/sample`` (see its README for source, crop and license).
``DEMO_RECIPE`` trains the default recipe (see ``deep3m.models.recipes``) for a
ten-minute budget on a 2-core CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deep3m.core.errors import InvalidArgumentError, NotFoundError
from deep3m.core.grey_levels import GreyLevels
from deep3m.core.store import Store
from deep3m.models.recipes import recipe_defaults

PACKAGE_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "cdeep3m-mito"
VOXEL_SIZE_NM = (40.0, 5.9, 5.9)


@dataclass(frozen=True)
class DemoData:
    train_images: Path
    train_labels: Path
    val_images: Path
    val_labels: Path
    description: str
    full: bool


def shared_data_root() -> Path:
    """``<repo>/../shared/data`` for an editable checkout (or the ``shared_data`` setting)."""
    from deep3m.runtime.settings import get_settings

    if get_settings().shared_data:
        return Path(get_settings().shared_data)
    # services/deep3m/training/demo_data.py → repo root is three levels up.
    return Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


def _layout(root: Path, description: str, full: bool) -> DemoData:
    return DemoData(
        train_images=root / "training" / "images",
        train_labels=root / "training" / "labels",
        val_images=root / "validation" / "images",
        val_labels=root / "validation" / "labels",
        description=description,
        full=full,
    )


def sample_paths(*, prefer_full: bool = True) -> DemoData:
    """Folders of PNG slices for training and validation images and labels."""
    full = shared_data_root() / "cdeep3m-mito"
    if prefer_full and (full / "training" / "images").is_dir():
        return _layout(
            full.resolve(),
            f"CDeep3M mitochondria, full set ({full.resolve()}): "
            "20 training + 10 validation slices of 1024×1024",
            True,
        )
    return _layout(
        PACKAGE_SAMPLE,
        f"CDeep3M mitochondria, packaged crop ({PACKAGE_SAMPLE}): "
        "20 training + 10 validation slices of 320×320",
        False,
    )


def load_stack(folder: Path) -> np.ndarray:
    """A folder of single-slice PNG/TIFF images, in name order, as a (Z, Y, X) array.

    Palette images give their raw indices (label values), not colours.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFoundError(f"image folder {folder} does not exist", field=str(folder))
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff"))
    if not files:
        raise InvalidArgumentError(f"no PNG or TIFF slices in {folder}", field=str(folder))
    slices = []
    for f in files:
        with Image.open(f) as im:
            slices.append(np.asarray(im))
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise InvalidArgumentError(
            f"slices in {folder} differ in shape: {sorted(shapes)}", field=str(folder)
        )
    return np.stack(slices)


def write_volume(
    store: Store,
    path: str,
    data: np.ndarray,
    voxel_size_nm: tuple[float, float, float] = VOXEL_SIZE_NM,
) -> str:
    """Write a small array as a complete OME-Zarr volume (tests, benchmarks, the demo)."""
    arr = store.create_volume(
        path,
        data.shape,
        data.dtype,
        voxel_size_nm=voxel_size_nm,
        chunk_shape=(min(8, data.shape[0]), 256, 256),
        overwrite=True,
    )
    arr[...] = data
    # Recorded as ingest records them: the data is at hand.
    store.mark_complete(path, **GreyLevels.of(data).attributes())
    return path


@dataclass(frozen=True)
class DemoRecipe:
    """What the demo trains: a recipe, its members and a time budget, plus the TTA level.

    ``minutes`` is the training budget of the whole ensemble; members train one after
    another, each for its share (``max_minutes``). ``iterations`` only bounds a run on
    fast hardware.
    """

    recipe: str
    members: tuple[str, ...]
    minutes: float
    iterations: int = 100_000
    validate_every: int = 400
    snapshot_every: int = 1000
    seed: int = 0
    tta_level: int = 10

    def scaled(self, budget_minutes: float) -> DemoRecipe:
        """The same recipe with a different training budget."""
        if budget_minutes <= 0:
            raise InvalidArgumentError(
                f"budget must be positive minutes, got {budget_minutes}", field="minutes"
            )
        return replace(self, minutes=budget_minutes)

    def train_kwargs(self) -> Mapping[str, Any]:
        """Keyword arguments named after TrainSpec fields (``Deep3mClient.train``).

        The architecture and width are spelled out (not left to the recipe) so that a
        scheduler filling its own default architecture cannot change them.
        """
        recipe = recipe_defaults(self.recipe)
        return {
            "recipe": self.recipe,
            "architecture": str(recipe["architecture"]),
            "width": float(recipe["width"]),
            "members": list(self.members),
            "iterations": self.iterations,
            "max_minutes": self.minutes / len(self.members),
            "validate_every": self.validate_every,
            "snapshot_every": self.snapshot_every,
            "seed": self.seed,
        }


# The default recipe (docs/ACCURACY.md) as one 1fm member for 10 minutes: on a 2-core
# CPU one member trained for the whole budget scores better than three sharing it.
DEMO_RECIPE = DemoRecipe(recipe="default", members=("1fm",), minutes=10.0)
