"""Blockwise postprocessing against whole-volume scipy, on real EM labels.

Data: the cdeep3m-mito training masks (20 x 1024 x 1024, mitochondria), turned
into a probability map (0.9 inside, 0.1 outside) and stored as an OME-Zarr
volume on file:// with the default chunks (8 x 256 x 256).

Baselines, measured side by side in the same run on the same data already in
memory: ``scipy.ndimage.label`` on the whole thresholded volume (labelling),
and ``deep3m.core.metrics.confusion_counts`` on the whole volume (evaluation).
The blockwise figures include reading from and writing to the store, the
object table, and (for labelling) three passes over the blocks; the baselines
do none of that. Times are medians of REPEATS runs after one warm-up run;
peak memory is the largest numpy allocation footprint traced by tracemalloc
during one extra run.

``python -m bench.bench_postprocess cluster [size]`` runs the sharded stages as a
``label`` job instead (:mod:`bench.sharded_cluster`): the masks cropped to
20 x size x size (default 512) in chunks of 4 x 128 x 128 (many blocks), on 1 and
2 postprocess worker processes pinned to one core each, beside whole-volume
``scipy.ndimage.label`` and ``cc3d.connected_components`` in memory (one run
each: the job rows include a process-level scheduler round trip per task).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
from deep3m.core.metrics import confusion_counts
from deep3m.core.store import Store
from deep3m.postprocess.evaluate import Operand, voxel_counts
from deep3m.postprocess.labels import LabelSpec, label_volume
from scipy import ndimage

from bench.timing import median_seconds, mito_masks, peak_mb

REPEATS = 3


def timed(run: Callable[[], object]) -> float:
    return median_seconds(run, REPEATS, warm_up=True)


def main() -> None:
    loaded = mito_masks()
    if loaded is None:
        return
    mask, prob = loaded
    voxels = prob.size
    with tempfile.TemporaryDirectory(prefix="deep3m-bench-") as tmp:
        store = Store(f"file://{tmp}")
        arr = store.create_volume(
            "volumes/p.zarr",
            prob.shape,
            "float32",
            voxel_size_nm=(40, 6, 6),
            attributes={"kind": "probabilities"},
        )
        arr[:] = prob
        store.mark_complete("volumes/p.zarr")
        gt = store.create_volume("volumes/gt.zarr", mask.shape, "uint8")
        gt[:] = mask.astype(np.uint8)
        store.mark_complete("volumes/gt.zarr")

        def whole_label() -> int:
            return int(ndimage.label(prob >= 0.5)[1])

        def blockwise_label(workers: int) -> Callable[[], int]:
            return lambda: (
                label_volume(store, "volumes/p.zarr", LabelSpec(), max_workers=workers).object_count
            )

        assert whole_label() == blockwise_label(1)()
        pred, truth = store.open_volume("volumes/p.zarr"), store.open_volume("volumes/gt.zarr")

        def whole_eval() -> object:
            return confusion_counts(prob >= 0.5, mask, exclusion_zone=2)

        def blockwise_eval(workers: int) -> Callable[[], object]:
            return lambda: voxel_counts(
                Operand(pred, "probability"),
                Operand(truth, "labels"),
                threshold=0.5,
                exclusion_zone=2,
                max_workers=workers,
            )

        assert whole_eval() == blockwise_eval(1)()
        print(
            f"volume {prob.shape} = {voxels / 1e6:.1f} Mvoxels, chunks {arr.chunks}, "
            f"median of {REPEATS}"
        )
        rows = [
            ("label: scipy whole volume (baseline)", whole_label, None),
            ("label: blockwise, 1 thread", blockwise_label(1), whole_label),
            ("label: blockwise, 2 threads", blockwise_label(2), whole_label),
            ("evaluate (zone 2): whole volume (baseline)", whole_eval, None),
            ("evaluate (zone 2): blockwise, 1 thread", blockwise_eval(1), whole_eval),
            ("evaluate (zone 2): blockwise, 2 threads", blockwise_eval(2), whole_eval),
        ]
        baseline_s: dict[object, float] = {}
        print(f"{'':44s} {'seconds':>8s} {'Mvox/s':>8s} {'x baseline':>10s} {'peak MB':>8s}")
        for name, run, base in rows:
            seconds = timed(run)
            if base is None:
                baseline_s[run] = seconds
            ratio = f"{baseline_s[base] / seconds:10.2f}" if base is not None else f"{1.0:10.2f}"
            print(
                f"{name:44s} {seconds:8.2f} {voxels / seconds / 1e6:8.1f} {ratio} "
                f"{peak_mb(run):8.0f}"
            )


def cluster(size: int = 512) -> None:
    import cc3d

    from bench.sharded_cluster import label_job_seconds

    loaded = mito_masks()
    if loaded is None:
        return
    prob = np.ascontiguousarray(loaded[1][:, :size, :size])
    voxels = prob.size

    def once(run: Callable[[], int]) -> tuple[float, int]:
        started = time.perf_counter()
        found = run()
        return time.perf_counter() - started, found

    with tempfile.TemporaryDirectory(prefix="deep3m-bench-") as tmp:
        store = Store(f"file://{tmp}")
        chunks = (4, 128, 128)
        arr = store.create_volume(
            "volumes/p.zarr", prob.shape, "float32", voxel_size_nm=(40, 6, 6),
            chunk_shape=chunks, attributes={"kind": "probabilities"},
        )  # fmt: skip
        arr[:] = prob
        store.mark_complete("volumes/p.zarr")
        blocks = int(np.prod([-(-s // c) for s, c in zip(prob.shape, chunks, strict=True)]))
        print(f"volume {prob.shape} = {voxels / 1e6:.1f} Mvoxels, {blocks} blocks of {chunks}")
        rows = [
            ("scipy.ndimage.label, in memory (baseline)",
             once(lambda: int(ndimage.label(prob >= 0.5)[1]))),
            ("cc3d.connected_components, in memory",
             once(lambda: int(cc3d.connected_components(prob >= 0.5, connectivity=6).max()))),
        ]  # fmt: skip
        for workers in (1, 2):
            seconds, job = label_job_seconds(
                store.url, "volumes/p.zarr", workers, chunks, tag=f"w{workers}"
            )
            rows.append(
                (
                    f"label job, {workers} worker process(es) x 1 core",
                    (seconds, int(job.metrics["objects"])),
                )
            )
        base = rows[0][1][0]
        print(f"{'':48s} {'seconds':>8s} {'Mvox/s':>8s} {'x baseline':>10s} {'objects':>8s}")
        for name, (seconds, found) in rows:
            print(
                f"{name:48s} {seconds:8.2f} {voxels / seconds / 1e6:8.2f} "
                f"{base / seconds:10.3f} {found:8d}"
            )
        counts = {found for _, (_, found) in rows}
        if len(counts) != 1:
            raise RuntimeError(f"object counts differ between rows: {rows}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["cluster"]:
        cluster(*(int(a) for a in sys.argv[2:3]))
    else:
        main()
