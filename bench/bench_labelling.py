"""Sharded labelling against whole-volume scipy and cc3d, in memory, on real EM labels.

Data: the cdeep3m-mito training masks (20 x 1024 x 1024, mitochondria) as a
probability map (0.9 inside, 0.1 outside), held in memory; blocks of
8 x 256 x 256 (the default chunk shape), so edge blocks in z are clipped.

Rows, measured side by side in one process on one thread:
``scipy.ndimage.label`` on the whole thresholded volume (the baseline),
``cc3d.connected_components`` on the same mask, and the sharded path
(:func:`deep3m.postprocess.sharded.pipeline.label_sharded`: per-block
summaries, face equivalences, merge, relabel, object table with surface,
solidity and sphericity) — which does far more than label. Then each sharded
stage's time, the merge's share, and from those a prediction for 100 workers
on a 1-teravoxel volume of the same content: parallel stages scale with
voxels / workers, the merge with the number of equivalences (which grows with
the block faces, i.e. with the number of blocks), the reduce with objects /
workers (it shards by label). Store I/O is not modelled.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import cc3d
import numpy as np
from deep3m.core.geometry import Block
from deep3m.postprocess.blockwise import block_plan, map_blocks
from deep3m.postprocess.labels import LabelSpec
from deep3m.postprocess.sharded.block import Labelling, summarize_block
from deep3m.postprocess.sharded.merge import LOCAL_BITS, equivalences_among, merge_pieces
from deep3m.postprocess.sharded.pipeline import label_sharded
from deep3m.postprocess.sharded.relabel import relabel_block
from deep3m.postprocess.sharded.table import reduce_objects
from scipy import ndimage

from bench.timing import median_seconds, mito_masks, peak_mb

BLOCK = (8, 256, 256)
REPEATS = 3
TERAVOXEL = 1e12
WORKERS = 100


def timed(run: Callable[[], object]) -> float:
    return median_seconds(run, REPEATS, warm_up=True)


def synthetic_merge_seconds_per_equivalence(blocks: int = 1000, pieces: int = 1000) -> float:
    """Union-find over random equivalences among ``blocks * pieces`` pieces."""
    rng = np.random.default_rng(0)
    n = blocks * pieces
    block = rng.integers(0, blocks, size=(n, 2))
    local = rng.integers(1, pieces + 1, size=(n, 2))
    pairs = np.concatenate([(block << LOCAL_BITS) | local, np.ones((n, 1), np.int64)], axis=1)
    sizes = [np.ones(pieces, np.int64)] * blocks
    seconds = median_seconds(lambda: merge_pieces(sizes, [pairs], (blocks, 1, 1)), 3)
    return seconds / n


def stopwatch(run: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    out = run()
    return time.perf_counter() - started, out


def main() -> None:
    loaded = mito_masks()
    if loaded is None:
        return
    _, prob = loaded
    voxels = prob.size
    target = np.zeros(prob.shape, np.uint32)
    spec = LabelSpec()

    def scipy_label() -> int:
        return int(ndimage.label(prob >= 0.5)[1])

    def cc3d_label() -> int:
        return int(cc3d.connected_components(prob >= 0.5, connectivity=6).max())

    def sharded() -> int:
        return label_sharded(prob, target, spec, block_shape=BLOCK).id_map.object_count

    assert scipy_label() == cc3d_label() == sharded()
    print(f"volume {prob.shape} = {voxels / 1e6:.1f} Mvoxels in memory, blocks {BLOCK}")
    print(f"{'':44s} {'seconds':>8s} {'Mvox/s':>8s} {'x scipy':>8s}")
    base = timed(scipy_label)
    for name, run in (
        ("scipy.ndimage.label, whole volume", scipy_label),
        ("cc3d, whole volume", cc3d_label),
        ("sharded path, all stages + table, 1 thread", sharded),
    ):
        seconds = base if run is scipy_label else timed(run)
        print(f"{name:44s} {seconds:8.2f} {voxels / seconds / 1e6:8.1f} {base / seconds:8.2f}")

    # One pass through the stages, each timed.
    plan = block_plan(prob.shape, None, BLOCK)
    labelling = Labelling("probability", spec.threshold, spec.connectivity)
    t_a, summaries = stopwatch(
        lambda: map_blocks(lambda b: summarize_block(prob, b.index, b.core, labelling), plan)
    )
    faces = {s.faces.index: s.faces for s in summaries}

    def pairs(block: Block) -> np.ndarray:
        return equivalences_among(faces, block.index, plan.grid_shape, 1)

    t_b1, found = stopwatch(lambda: map_blocks(pairs, plan))
    t_b2, id_map = stopwatch(
        lambda: merge_pieces(
            [s.pieces.counts for s in summaries],
            found,
            plan.grid_shape,
        )
    )
    t_c, _ = stopwatch(
        lambda: map_blocks(
            lambda b: relabel_block(prob, target, b.index, b.core, id_map, labelling), plan
        )
    )
    t_d, table = stopwatch(
        lambda: reduce_objects((s.pieces for s in summaries), id_map, (40, 6, 6))
    )
    equivalences = id_map.equivalences
    total = t_a + t_b1 + t_b2 + t_c + t_d
    print(
        f"\nstages ({len(plan)} blocks, {len(id_map.lut)} pieces, {equivalences} equivalences, "
        f"{len(table)} objects)"
    )
    for name, seconds in (
        ("(a) summarize blocks", t_a),
        ("(b) equivalences per block", t_b1),
        ("(b) merge (union-find), once", t_b2),
        ("(c) relabel blocks", t_c),
        ("(d) reduce object table, once", t_d),
    ):
        print(f"  {name:42s} {seconds:8.3f} s  {100 * seconds / total:5.1f} %")

    # A worker's memory per task: the same blocks, a volume 1x and 4x as large.
    print("\npeak traced memory of the per-block stages (MB), one block at a time:")
    for factor in (1, 4):
        volume = prob if factor == 1 else np.tile(prob, (1, 2, 2))
        peak = peak_mb(
            lambda volume=volume: map_blocks(
                lambda b: len(summarize_block(volume, b.index, b.core, labelling).pieces),
                block_plan(volume.shape, None, BLOCK),
            )
        )
        print(f"  volume {factor}x {volume.shape}: summarize {peak:6.0f}")

    # Prediction: parallel stages per voxel, merge per equivalence, reduce per object.
    scale = TERAVOXEL / voxels
    parallel_s = (t_a + t_b1 + t_c) * scale / WORKERS
    # Equivalences grow with the blocks, i.e. with the voxels; the merge's cost per
    # equivalence is measured on a synthetic graph large enough to time.
    per_equivalence = synthetic_merge_seconds_per_equivalence()
    merge_s = per_equivalence * equivalences * scale
    # Objects grow with the volume too; the reduce shards by label (reduce_objects(shard=)).
    reduce_s = t_d * scale / WORKERS
    predicted = parallel_s + merge_s + reduce_s
    print(f"\nmerge: {per_equivalence * 1e9:.0f} ns per equivalence (synthetic, 10^6 of them)")
    print(
        f"predicted for {WORKERS} workers on 1 teravoxel: {predicted / 3600:.1f} h "
        f"(parallel stages {parallel_s / 3600:.1f} h, merge {merge_s / 3600:.2f} h = "
        f"{100 * merge_s / predicted:.1f} %, reduce {reduce_s / 3600:.2f} h = "
        f"{100 * reduce_s / predicted:.1f} %)"
    )


if __name__ == "__main__":
    main()
