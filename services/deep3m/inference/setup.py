"""Predictor setup shared by predict tasks and interactive regions.

Both paths resolve references against the same roots, take the least busy
device, build the ensemble from the shared model cache and run the same
read → mirror-pad → predict sequence, so a region and a task predicting the
same core give the same voxels.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deep3m.adaptation.histogram import (
    apply_lut,
    lut_from_counts,
    prediction_reference,
    volume_counts,
)
from deep3m.core.geometry import Block, Box, ReadableArray, read_padded
from deep3m.core.locations import StoreRoots
from deep3m.inference.cache import DevicePool, ModelCache
from deep3m.inference.predictor import EnsemblePredictor, inference_devices
from deep3m.models.card import ModelCard
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import StopFlag

# Prediction-time histogram maps kept (one per model and input volume).
MAX_HISTOGRAM_MAPS = 64


@dataclass(frozen=True)
class BlockPrediction:
    """The core's foreground probability (float32) and where the time went."""

    probabilities: np.ndarray
    read_seconds: float
    predict_seconds: float
    # Time spent waiting for a compute slot while other blocks computed (pipelining).
    wait_seconds: float = 0.0


class PredictorSetup:
    """Roots, loaded models and devices: the base of predict tasks and interactive regions."""

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
        self._maps: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._maps_lock = threading.Lock()

    def histogram_map(
        self, card: ModelCard, source: ReadableArray, volume_id: str
    ) -> np.ndarray | None:
        """The grey-level map taking the whole input volume onto the model's training
        histogram, when the card asks for it (None otherwise). Built once per volume
        from its whole histogram, so every block of it gets the same map (no seams)."""
        reference = prediction_reference(card.adaptation)
        if reference is None:
            return None
        key = (card.id, volume_id or f"object:{id(source)}")
        with self._maps_lock:
            lut = self._maps.get(key)
        if lut is None:
            lut = lut_from_counts(volume_counts(source), reference)
            with self._maps_lock:
                self._maps[key] = lut
                while len(self._maps) > MAX_HISTOGRAM_MAPS:
                    self._maps.popitem(last=False)
        return lut

    def predict_box(
        self,
        source: ReadableArray,
        core: Box,
        *,
        read: Box | None = None,
        model: str,
        members: Sequence[str],
        tta_level: int,
        cancelled: StopFlag | None = None,
        interrupted: StopFlag | None = None,
        volume_id: str = "",
    ) -> BlockPrediction:
        """Predict ``core`` of ``source`` from one mirror-padded read of ``read``.

        ``read`` defaults to the core grown by the model card's halo; either way
        its z extent is the context the members need. Only the computation holds
        a compute slot of the device: the model lookup and the read run while
        other blocks compute. ``volume_id`` names the source volume (the key of its
        prediction-time histogram map). ``cancelled`` ends the wait for the device
        and the computation; ``interrupted`` (default: ``cancelled``) ends the wait
        only: a stopping worker gives back the blocks that have not reached the
        device, and the one computing finishes.
        """
        with self.devices.acquire() as device:
            loaded = self.cache.get(self.roots.store(), model, list(members), device)
            predictor = EnsemblePredictor(
                loaded.card,
                loaded.members,
                tta_level=tta_level,
                device=device,
                batch_size=self.settings.batch_size,
            )
            block = Block((0,) * core.ndim, core, read or core.grow(loaded.card.halo))
            box = predictor.read_box(block)
            t0 = time.perf_counter()
            raw = read_padded(source, box)
            lut = self.histogram_map(loaded.card, source, volume_id)
            if lut is not None:
                raw = apply_lut(raw, lut)
            t1 = time.perf_counter()
            with self.devices.compute(device, interrupted or cancelled):
                t2 = time.perf_counter()
                pred = predictor.predict_core(raw, core, box, cancelled=cancelled)
            t3 = time.perf_counter()
        return BlockPrediction(pred, t1 - t0, t3 - t2, t2 - t1)
