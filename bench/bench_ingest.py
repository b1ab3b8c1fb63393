"""Ingest throughput: PNG stacks into OME-Zarr on file:// and on a local S3 server.

Baseline, measured side by side in the same run: decoding the same PNG files
with Pillow and nothing else (the least any ingest has to do). Also timed alone:
counting the grey levels ingest records (``GreyLevels`` per 8-slice layer, part
of every ingest above). Figures are medians of REPEATS runs; MB/s counts
uncompressed image bytes (1 MB = 10^6 B).
S3 is SeaweedFS on loopback (same machine), started like the test fixture.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from deep3m.core.grey_levels import GreyLevels
from deep3m.core.ingest import ingest
from deep3m.core.store import Store
from deep3m.testing.seaweed import seaweed_server, weed_executable
from PIL import Image

from bench.timing import median_seconds

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
STACKS = {
    "isbi2012 train (30x512x512)": DATA / "isbi2012" / "train" / "images",
    "cdeep3m-mito training (20x1024x1024)": DATA / "cdeep3m-mito" / "training" / "images",
}
REPEATS = 5
WORKERS = 4


def read_with_pillow(folder: Path) -> int:
    return sum(np.asarray(Image.open(p)).nbytes for p in sorted(folder.glob("*.png")))


def count_levels(stack: np.ndarray) -> GreyLevels:
    """What ingest adds per layer of the default chunk depth (8 slices)."""
    return GreyLevels.total(GreyLevels.of(stack[z : z + 8]) for z in range(0, len(stack), 8))


def ingest_seconds(folder: Path, store: Store) -> float:
    """Median time of a whole ingest (validate, write, mark complete); clean-up not timed."""
    times = []
    for attempt in range(REPEATS + 1):
        path = f"bench/{uuid.uuid4().hex[:8]}.zarr"
        started = time.perf_counter()
        ingest(str(folder), store, path, voxel_size_nm=(40, 6, 6), workers=WORKERS)
        elapsed = time.perf_counter() - started
        store.delete(path)
        if attempt:  # the first run warms imports, connection pools and the page cache
            times.append(elapsed)
    return statistics.median(times)


def main() -> None:
    missing = [str(p) for p in STACKS.values() if not p.is_dir()]
    if missing:
        print(f"skipped: shared data not found ({', '.join(missing)})")
        return
    rows: list[tuple[str, str, float, float, float]] = []
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ingest-"))
        stores = {"file://": Store(f"file://{tmp}/store")}
        if weed_executable() is not None:
            server = stack.enter_context(seaweed_server(Path(tmp) / "s3"))
            stores["s3:// (SeaweedFS)"] = Store(server.url("bench"), server.storage_options)
        else:
            print("note: 'weed' not installed; S3 rows skipped")
        for name, folder in STACKS.items():
            nbytes = read_with_pillow(folder)
            baseline = median_seconds(lambda folder=folder: read_with_pillow(folder), REPEATS)
            for label, store in stores.items():
                seconds = ingest_seconds(folder, store)
                rows.append((name, label, nbytes / seconds / 1e6, seconds, seconds / baseline))
            rows.append(
                (name, "baseline: Pillow decode only", nbytes / baseline / 1e6, baseline, 1.0)
            )
            data = np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])
            counting = median_seconds(lambda data=data: count_levels(data), REPEATS)
            rows.append(
                (name, "grey-level counting alone", nbytes / counting / 1e6, counting,
                 counting / baseline)
            )  # fmt: skip
    print(f"ingest, {WORKERS} worker threads, median of {REPEATS} runs")
    print(f"{'stack':38} {'target':30} {'MB/s':>8} {'seconds':>8} {'x baseline':>10}")
    for name, label, rate, seconds, ratio in rows:
        print(f"{name:38} {label:30} {rate:8.1f} {seconds:8.3f} {ratio:10.2f}")


if __name__ == "__main__":
    main()
