"""Sharded postprocess on 1 and 2 worker processes, beside scipy and cc3d in memory.

``python -m bench postprocess [--size=1024] [--chunk=256] [--block=512] [--capacity=2]
[--repeats=1]``
runs the sharded stages as ``label`` jobs (:mod:`bench.sharded_cluster`) over the
cdeep3m-mito training masks (20 x size x size, mitochondria) turned into a
probability map (0.9 inside, 0.1 outside), stored on file:// in chunks of
4 x chunk² and labelled in blocks of 4 x block² (several chunks per task), on 1
and 2 ``deep3m serve postprocess`` processes pinned to one core each (each
holding ``capacity`` leases, so store I/O overlaps compute). Beside them, in the
same run: whole-volume ``scipy.ndimage.label`` (the baseline) and
``cc3d.connected_components`` on the same mask in memory, one process. Printed:
the 2-vs-1 ratio and the serial share it implies (Amdahl), each stage's wall time
on 1 and 2 workers and what the 2-worker stage takes beyond half the 1-worker
one (its tail, hand-over and contention), the per-block and merge costs, the
predicted time of 100 workers on a teravoxel with the merge's share, and the
workers' peak RSS on this volume and on one 4x as large (a mirrored 2 x 2
mosaic of it), and the 2-vs-1 ratio on that 4x volume too (4x the blocks, the
same fixed per-stage hand-overs). The job rows include every scheduler round trip;
the workers' CPU seconds on 1 and 2 workers show what running side by side costs
(shared caches and memory bandwidth). ``--repeats=N`` runs the 1- and
2-worker jobs N times, alternating, and prints every ratio and their median (the
breakdown is of the last pair).

``python -m bench.bench_postprocess blockwise`` times the in-process blockwise
passes (``label_volume`` and ``voxel_counts`` on threads) against whole-volume
scipy and ``confusion_counts`` (medians of REPEATS runs, tracemalloc peaks).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

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


def blockwise() -> None:
    """The in-process blockwise passes (threads) against whole-volume scipy."""
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


def _store_probabilities(store: Store, key: str, prob: np.ndarray, chunks: tuple[int, ...]) -> None:
    arr = store.create_volume(
        key, prob.shape, "float32", voxel_size_nm=(40, 6, 6),
        chunk_shape=chunks, attributes={"kind": "probabilities"},
    )  # fmt: skip
    arr[:] = prob
    store.mark_complete(key)


def cluster(argv: Sequence[str] = ()) -> None:
    """The sharded label job on 1 and 2 single-core worker processes (see the module doc)."""
    import cc3d

    from bench.sharded_cluster import JobRun, label_job

    options = {k: int(v) for k, v in (a.removeprefix("--").split("=") for a in argv)}
    size = options.get("size", 1024)
    chunk_yx = options.get("chunk", 256)
    block_yx = options.get("block", 512)
    capacity = options.get("capacity", 2)
    repeats = max(1, options.get("repeats", 1))
    loaded = mito_masks()
    if loaded is None:
        return
    prob = np.ascontiguousarray(loaded[1][:, :size, :size])
    # 4x: the slices mirrored into a 2 x 2 mosaic in y and x (a synthetic enlargement).
    big = np.block([[prob, prob[:, :, ::-1]], [prob[:, ::-1, :], prob[:, ::-1, ::-1]]])
    chunks, block = (4, chunk_yx, chunk_yx), (4, block_yx, block_yx)
    voxels = prob.size

    def once(run: Callable[[], int]) -> tuple[float, int]:
        started = time.perf_counter()
        found = run()
        return time.perf_counter() - started, found

    with tempfile.TemporaryDirectory(prefix="deep3m-bench-") as tmp:
        store = Store(f"file://{tmp}")
        _store_probabilities(store, "volumes/p.zarr", prob, chunks)
        _store_probabilities(store, "volumes/p4.zarr", big, chunks)
        blocks = int(np.prod([-(-s // c) for s, c in zip(prob.shape, block, strict=True)]))
        print(
            f"volume {prob.shape} = {voxels / 1e6:.1f} Mvoxels (real masks), chunks {chunks}, "
            f"{blocks} blocks of {block}; workers pinned to one core each, {capacity} leases "
            f"each; 4x volume {big.shape} (mirrored mosaic)"
        )
        rows = [
            ("scipy.ndimage.label, in memory (baseline)",
             once(lambda: int(ndimage.label(prob >= 0.5)[1]))),
            ("cc3d.connected_components, in memory",
             once(lambda: int(cc3d.connected_components(prob >= 0.5, connectivity=6).max()))),
        ]  # fmt: skip
        runs: dict[int, JobRun] = {}
        ratios = []
        for repeat in range(repeats):
            for workers in (1, 2):
                runs[workers] = label_job(
                    store.url, "volumes/p.zarr", workers, block, tag=f"w{workers}-r{repeat}",
                    capacity=capacity,
                )  # fmt: skip
            ratios.append(runs[1].seconds / runs[2].seconds)
        for workers in (1, 2):
            rows.append(
                (f"label job, {workers} worker process(es) x 1 core",
                 (runs[workers].seconds, int(runs[workers].job.metrics["objects"]))),
            )  # fmt: skip
        base = rows[0][1][0]
        print(f"{'':48s} {'seconds':>8s} {'Mvox/s':>8s} {'x scipy':>8s} {'objects':>8s}")
        for name, (seconds, found) in rows:
            print(
                f"{name:48s} {seconds:8.2f} {voxels / seconds / 1e6:8.2f} "
                f"{base / seconds:8.3f} {found:8d}"
            )
        counts = {found for _, (_, found) in rows}
        if len(counts) != 1:
            raise RuntimeError(f"object counts differ between rows: {rows}")
        one, two = runs[1], runs[2]
        listed = ", ".join(f"{r:.2f}" for r in ratios)
        print(
            f"2 workers vs 1: {statistics.median(ratios):.2f}x (median of {len(ratios)}: "
            f"{listed}; target >= 1.7x)"
        )
        for workers, run in ((1, one), (2, two)):
            print(
                f"  {workers} worker(s): CPU s workers {run.workers_cpu_s:.2f}, scheduler "
                f"{run.scheduler_cpu_s:.2f} (wall {run.seconds:.2f}; load average "
                f"{os.getloadavg()[0]:.2f})"
            )
        # Amdahl on 2 workers: T2 = T1 (s + (1 - s) / 2), so s = 2 T2 / T1 - 1.
        serial_share = 2 * two.seconds / one.seconds - 1
        print(
            f"serial share (Amdahl, 2 T2 / T1 - 1): {100 * serial_share:.1f} % of the "
            "1-worker time (under 17.6 % for 1.7x)"
        )
        print("stage seconds (1 worker / 2 workers / 2 workers beyond half of 1, tasks):")
        tasks = {s.name: s.tasks_total for s in one.job.stages}
        for name in one.stage_seconds:
            a, b = one.stage_seconds[name], two.stage_seconds[name]
            print(f"  {name:14s} {a:7.3f} {b:7.3f} {b - a / 2:+7.3f} {tasks.get(name, 0):5d}")
        print(
            f"  {'whole job':14s} {one.seconds:7.3f} {two.seconds:7.3f} "
            f"{two.seconds - one.seconds / 2:+7.3f}"
        )
        sharded = {s.name for s in one.job.stages if s.tasks_total > 1}
        # One worker runs every task of a sharded stage in turn.
        per_block = sum(s for n, s in one.stage_seconds.items() if n in sharded)
        serial = one.seconds - per_block
        merge_wall = one.stage_seconds.get("merge", 0.0)
        merge_s = one.job.metrics["merge_seconds"]
        equivalences = one.job.metrics["equivalences"]
        print(
            f"per block (all sharded stages, 1 worker): {per_block / blocks * 1e3:.1f} ms "
            f"= {per_block / voxels * 1e9:.1f} ns/voxel; merge {merge_s * 1e3:.1f} ms of work "
            f"({merge_s / max(equivalences, 1) * 1e6:.1f} us per equivalence, "
            f"{equivalences:.0f} over {blocks} blocks; {merge_wall:.3f} s stage wall); "
            f"single-task stages {serial:.3f} s wall, mostly stage hand-overs"
        )
        tera = 1e12
        scale = tera / voxels
        # Sharded stages spread over the workers; the merge reads one small document
        # pair per block and its union-find grows with the face equivalences, which at
        # a fixed block shape and object density grow with the number of blocks; the
        # hand-overs between stages are a fixed cost per stage.
        parallel_s = per_block * scale / 100
        merge_tera = merge_s * scale
        total = parallel_s + merge_tera + serial
        print(
            f"predicted 100 workers, 1 teravoxel ({scale * blocks:.0f} blocks of {block}): "
            f"{total / 3600:.2f} h = sharded {parallel_s / 3600:.2f} h + merge "
            f"{merge_tera / 3600:.2f} h ({100 * merge_tera / total:.1f} %) + hand-overs "
            f"{serial:.1f} s"
        )
        four = label_job(store.url, "volumes/p4.zarr", 1, block, tag="x4", capacity=capacity)
        four_two = label_job(store.url, "volumes/p4.zarr", 2, block, tag="x4w2", capacity=capacity)
        expected = int(ndimage.label(big >= 0.5)[1])
        for run in (four, four_two):
            if int(run.job.metrics["objects"]) != expected:
                raise RuntimeError("the 4x volume's object count differs from scipy's")
        print(
            f"worker peak RSS: 1x volume {one.worker_peak_mb:.0f} MB, 4x volume "
            f"{four.worker_peak_mb:.0f} MB ({four.seconds:.2f} s, "
            f"{big.size / four.seconds / 1e6:.2f} Mvox/s on 1 worker)"
        )
        print(
            f"4x volume ({4 * blocks} blocks): 2 workers vs 1: "
            f"{four.seconds / four_two.seconds:.2f}x ({four.seconds:.2f} s / "
            f"{four_two.seconds:.2f} s)"
        )


def main(argv: Sequence[str] = ()) -> None:
    cluster(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["blockwise"]:
        blockwise()
    else:
        main(sys.argv[1:])
