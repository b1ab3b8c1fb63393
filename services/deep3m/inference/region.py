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
from deep3m.core.geometry import Block, Box, read_padded
from deep3m.core.locations import StoreRoots
from deep3m.inference.cache import DevicePool, ModelCache
from deep3m.inference.predictor import EnsemblePredictor, inference_devices
from deep3m.runtime.settings import Settings


class RegionPredictor:
    def __init__(
        self,
        settings: Settings,
        *,
        cache: ModelCache | None = None,
        devices: DevicePool | None = None,
    ) -> None:
        self.settings = settings
        self.roots = StoreRoots.from_settings(settings)
        self.cache = cache if cache is not None else ModelCache()
        self.devices = (
            devices if devices is not None else DevicePool(inference_devices(settings.device))
        )

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
        with self.devices.acquire() as device:
            loaded = self.cache.get(self.roots.store(), model, members, device)
            predictor = EnsemblePredictor(
                loaded.card,
                loaded.members,
                tta_level=level,
                device=device,
                batch_size=self.settings.batch_size,
            )
            block = Block((0, 0, 0), region, region.grow(loaded.card.halo))
            read = predictor.read_box(block)
            raw = read_padded(source, read)
            return predictor.predict_core(raw, region, read)
