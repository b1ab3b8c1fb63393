"""What every benchmark times with, and the real masks several of them run on."""

from __future__ import annotations

import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

MITO_LABELS = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cdeep3m-mito"
    / "training" / "labels"
)  # fmt: skip


def median_seconds(run: Callable[[], object], repeats: int, *, warm_up: bool = False) -> float:
    """Median wall time of ``repeats`` runs (after one untimed run with ``warm_up``)."""
    if warm_up:
        run()  # imports, page cache
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def peak_mb(run: Callable[[], object]) -> float:
    """Peak of the numpy and Python allocations during ``run`` (tracemalloc), in MB."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def mito_masks() -> tuple[np.ndarray, np.ndarray] | None:
    """The cdeep3m-mito training masks (20 x 1024 x 1024, bool) and a probability map of
    them (0.9 inside, 0.1 outside, float32); None when the data is absent."""
    if not MITO_LABELS.is_dir():
        print(f"skipped: {MITO_LABELS} not found")
        return None
    mask = np.stack([np.asarray(Image.open(p)) for p in sorted(MITO_LABELS.glob("*.png"))]) > 0
    return mask, np.where(mask, 0.9, 0.1).astype(np.float32)
