"""Interactive prediction of a small region, answered directly (not as a job).

The region is predicted with the model card's halo of context (mirror-padded
at the volume border), exactly as a predict task would predict the same core.
Its size is bounded by ``max_region_voxels``: voxels travel over gRPC only
here, so the bound keeps replies small.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deep3m.core.augmentation import IDENTITY_LEVEL, check_tta_level
from deep3m.core.errors import InvalidArgumentError, ResourceExhaustedError
from deep3m.core.geometry import Box
from deep3m.inference.setup import PredictorSetup


class RegionPredictor(PredictorSetup):
    def check_region(self, region: Box) -> None:
        if region.ndim != 3 or region.empty:
            raise InvalidArgumentError(
                f"region {region} must be a non-empty 3D box (z, y, x)", field="region"
            )
        if region.size > self.settings.max_region_voxels:
            raise ResourceExhaustedError(
                f"region {region} of shape {list(region.shape)} has {region.size} voxels, over "
                f"the interactive limit of {self.settings.max_region_voxels} "
                "(DEEP3M_MAX_REGION_VOXELS); submit a predict job for larger regions",
                field="region",
            )

    def predict(
        self,
        *,
        store_url: str,
        path: str,
        array: str,
        region: Box,
        model: str,
        tta_level: int = 0,
        members: Sequence[str] = (),
    ) -> np.ndarray:
        """Foreground probability (float32, the region's shape) of ``region`` of a volume."""
        self.check_region(region)
        level = check_tta_level(tta_level or IDENTITY_LEVEL)
        store, key = self.roots.resolve(store_url, path, field="input")
        source = store.open_volume(key, array)
        if not Box.from_shape(source.shape).contains(region):
            raise InvalidArgumentError(
                f"region {region} is not inside the volume {store.key_url(key)} of shape "
                f"{list(source.shape)}",
                field="region",
            )
        return self.predict_box(
            source,
            region,
            model=model,
            members=members,
            tta_level=level,
            volume_id=f"{store.key_url(key)}[{array}]",
        ).probabilities
