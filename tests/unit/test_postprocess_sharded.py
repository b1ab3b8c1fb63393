"""The sharded labelling stages against whole-volume references (scipy, numpy, qhull)."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from deep3m.core.errors import FailedPreconditionError, InvalidArgumentError
from deep3m.core.geometry import Box, plan_blocks
from deep3m.core.store import Store
from deep3m.postprocess.labels import LabelSpec, label_array
from deep3m.postprocess.sharded.block import (
    BlockFaces,
    Labelling,
    PieceStats,
    from_document_bytes,
    summarize_block,
    to_document_bytes,
)
from deep3m.postprocess.sharded.merge import (
    IdMap,
    block_equivalences,
    equivalences_among,
    merge_pieces,
    neighbour_indices,
)
from deep3m.postprocess.sharded.pipeline import label_sharded, labelling_for
from deep3m.postprocess.sharded.relabel import relabel_block
from deep3m.postprocess.sharded.stored import (
    Documents,
    equivalences_task,
    merge_task,
    reduce_part_task,
    reduce_task,
    relabel_task,
    summarize_task,
)
from deep3m.postprocess.sharded.table import (
    COLUMNS,
    concat_tables,
    reduce_objects,
    table_keys,
    write_object_tables,
)
from deep3m.testing.volumes import memory_array, same_partition, smooth_field, write_volume
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull
from skimage.measure import regionprops

FACE_CENTRES = np.array(
    [(-0.5, 0, 0), (0.5, 0, 0), (0, -0.5, 0), (0, 0.5, 0), (0, 0, -0.5), (0, 0, 0.5)]
)


def boundary_faces(labels: np.ndarray, label: int) -> np.ndarray:
    """Faces normal to z, y, x between the object and anything else (outside counts)."""
    obj = np.pad(labels == label, 1)
    return np.array([np.count_nonzero(np.diff(obj, axis=a)) for a in range(3)])


def convex_voxels(coords: np.ndarray, shape: tuple[int, ...]) -> int:
    """Voxel centres of the whole grid inside the hull of every voxel's face centres."""
    hull = ConvexHull((coords[:, None, :] + FACE_CENTRES[None]).reshape(-1, 3))
    grid = np.argwhere(np.ones(shape, bool))
    inside = grid @ hull.equations[:, :3].T + hull.equations[:, 3] <= 1e-9
    return int(inside.all(axis=1).sum())


@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize(("shape", "chunks"), [((17, 30, 37), (4, 8, 8)), ((9, 16, 16), (3, 5, 7))])
def test_labels_equal_whole_volume_scipy_label(
    connectivity: int, shape: tuple[int, int, int], chunks: tuple[int, int, int]
) -> None:
    # Edge blocks are clipped: neither shape is a multiple of its chunks.
    prob = smooth_field(shape, seed=connectivity, sigma=1.2)
    target = memory_array(prob, chunks, dtype="uint32")
    result = label_sharded(prob, target, LabelSpec(threshold=0.55, connectivity=connectivity))
    structure = ndimage.generate_binary_structure(3, connectivity)
    want, n = ndimage.label(prob >= 0.55, structure=structure)
    got = np.asarray(target[...])
    assert result.id_map.object_count == n == len(result.objects)
    assert n > 0
    # Objects cross blocks: fewer objects than pieces, joined across faces.
    assert result.id_map.equivalences > 0 and len(result.id_map.lut) > n
    assert same_partition(got, want)
    assert set(np.unique(got)) == set(range(n + 1))


def test_object_statistics_equal_direct_numpy() -> None:
    shape, voxel = (12, 40, 36), np.array([40.0, 6.0, 5.0])
    prob = smooth_field(shape, seed=4, sigma=1.6)
    target = memory_array(prob, (4, 16, 16), dtype="uint32")
    result = label_sharded(
        prob, target, LabelSpec(threshold=0.6, connectivity=1), voxel_size_nm=tuple(voxel)
    )
    labels = np.asarray(target[...])
    table = result.objects
    assert len(table) > 3
    face_area = np.array([voxel[1] * voxel[2], voxel[0] * voxel[2], voxel[0] * voxel[1]])
    for row, label in enumerate(table.labels):
        coords = np.argwhere(labels == label)
        assert table.volume_voxels[row] == len(coords)
        assert table.volume_nm3[row] == pytest.approx(len(coords) * voxel.prod())
        np.testing.assert_allclose(table.centroid[row], coords.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(table.centroid_nm[row], coords.mean(axis=0) * voxel)
        assert (table.bbox_start[row] == coords.min(axis=0)).all()
        assert (table.bbox_stop[row] == coords.max(axis=0) + 1).all()
        assert table.mean_probability[row] == pytest.approx(prob[labels == label].mean())
        faces = boundary_faces(labels, label)
        assert table.boundary_face_area_nm2[row] == pytest.approx(faces @ face_area)
        assert table.convex_voxels[row] == convex_voxels(coords, shape)
    assert (table.solidity > 0).all() and (table.solidity <= 1 + 1e-9).all()


def test_a_ball_is_round_and_solid() -> None:
    z, y, x = np.mgrid[:30, :30, :30]
    ball = ((z - 14.5) ** 2 + (y - 14.5) ** 2 + (x - 14.5) ** 2 <= 12**2).astype(np.uint8)
    target = memory_array(ball, (8, 8, 8), dtype="uint32")
    table = label_sharded(ball, target, LabelSpec(), voxel_size_nm=(5.0, 5.0, 5.0)).objects
    assert len(table) == 1
    assert table.surface_area_nm2[0] == pytest.approx(4 * np.pi * (12 * 5.0) ** 2, rel=0.05)
    assert table.sphericity[0] == pytest.approx(1.0, abs=0.06)
    # Solidity as skimage defines it, from blockwise partial hulls.
    assert table.solidity[0] == pytest.approx(regionprops(ball)[0].solidity, rel=1e-12)
    assert table.mean_probability[0] == 1.0  # a mask: every voxel is certain


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(*(st.integers(2, 13) for _ in range(3))),
    block=st.tuples(*(st.integers(1, 6) for _ in range(3))),
    connectivity=st.sampled_from([1, 2, 3]),
    density=st.floats(0.2, 0.7),
    seed=st.integers(0, 2**16),
)
def test_any_blocking_gives_the_whole_volume_partition(
    shape: tuple[int, int, int],
    block: tuple[int, int, int],
    connectivity: int,
    density: float,
    seed: int,
) -> None:
    mask = (np.random.default_rng(seed).random(shape) < density).astype(np.uint8)
    target = np.zeros(shape, np.uint32)
    result = label_sharded(mask, target, LabelSpec(connectivity=connectivity), block_shape=block)
    want, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, connectivity))
    assert result.id_map.object_count == n
    assert same_partition(target, want)
    sizes = np.bincount(want.ravel())[1:]
    assert sorted(result.objects.volume_voxels.tolist()) == sorted(sizes.tolist())


def test_min_size_drops_the_same_objects_as_label() -> None:
    prob = smooth_field((10, 32, 32), seed=8, sigma=1.0)
    spec = LabelSpec(threshold=0.6, min_size_voxels=20)
    sharded = memory_array(prob, (4, 8, 8), dtype="uint32")
    whole = memory_array(prob, (4, 8, 8), dtype="uint32")
    result = label_sharded(prob, sharded, spec)
    reference = label_array(prob, whole, spec)
    assert result.id_map.object_count == reference.object_count > 0
    assert same_partition(np.asarray(sharded[...]), np.asarray(whole[...]))
    assert (result.objects.volume_voxels >= 20).all()


def chunk_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("c/*/*/*")}


def test_stages_are_idempotent(tmp_path: Path) -> None:
    """Re-running any task rewrites the same bytes: documents and label chunks alike."""
    prob = smooth_field((8, 24, 24), seed=2)
    source = memory_array(prob, (4, 8, 8))
    target = zarr.create_array(
        zarr.storage.LocalStore(tmp_path / "labels.zarr"),
        shape=prob.shape, chunks=(4, 8, 8), dtype="uint32", fill_value=0,
    )  # fmt: skip
    label_sharded(source, target, LabelSpec(threshold=0.5, connectivity=3))
    before = chunk_bytes(tmp_path / "labels.zarr")
    assert before
    plan = plan_blocks(prob.shape, (4, 8, 8))
    labelling = Labelling("probability", 0.5, 3)
    summaries = [summarize_block(source, b.index, b.core, labelling) for b in plan]
    again = [summarize_block(source, b.index, b.core, labelling) for b in plan]
    for one, two in zip(summaries, again, strict=True):
        assert one.faces.to_bytes() == two.faces.to_bytes()
        assert one.pieces.to_bytes() == two.pieces.to_bytes()
    faces = {s.faces.index: s.faces for s in summaries}
    pairs = [equivalences_among(faces, b.index, plan.grid_shape, 3) for b in plan]
    id_map = merge_pieces([s.pieces.counts for s in summaries], pairs, plan.grid_shape)
    for block in plan:  # a retried relabel task
        relabel_block(source, target, block.index, block.core, id_map, labelling)
    assert chunk_bytes(tmp_path / "labels.zarr") == before


def test_stages_run_from_their_documents_alone() -> None:
    """What one task writes is all the next needs: every stage from serialized documents."""
    prob = smooth_field((9, 20, 22), seed=5)
    labelling = Labelling("probability", 0.5, 2)
    plan = plan_blocks(prob.shape, (3, 8, 8))
    faces_docs, piece_docs = {}, {}
    for b in plan:
        summary = summarize_block(prob, b.index, b.core, labelling)
        faces_docs[b.index] = summary.faces.to_bytes()
        piece_docs[b.index] = summary.pieces.to_bytes()
    pair_docs = []
    for b in plan:
        wanted = neighbour_indices(b.index, plan.grid_shape, 2)
        neighbours = {i: BlockFaces.from_bytes(faces_docs[i]) for i in wanted}
        own = BlockFaces.from_bytes(faces_docs[b.index])
        pair_docs.append(block_equivalences(own, neighbours, plan.grid_shape, 2))
    pieces = [PieceStats.from_bytes(piece_docs[b.index]) for b in plan]
    id_map = IdMap.from_bytes(
        merge_pieces([p.counts for p in pieces], pair_docs, plan.grid_shape).to_bytes()
    )
    target = np.zeros(prob.shape, np.uint32)
    for b in plan:
        relabel_block(prob, target, b.index, b.core, id_map, labelling)
    want, n = ndimage.label(prob >= 0.5, structure=ndimage.generate_binary_structure(3, 2))
    assert id_map.object_count == n
    assert same_partition(target, want)


def test_merge_cost_follows_equivalences_not_voxels() -> None:
    """Only pieces on faces produce equivalences: a volume 8× larger with the same
    objects yields the same equivalences."""
    small = np.zeros((8, 16, 16), np.uint8)
    small[2:6, 6:10, 6:10] = 1  # one cube across the centre seams
    large = np.zeros((16, 32, 32), np.uint8)
    large[2:6, 6:10, 6:10] = 1
    counts = []
    for volume in (small, large):
        target = np.zeros(volume.shape, np.uint32)
        result = label_sharded(volume, target, LabelSpec(), block_shape=(4, 8, 8))
        counts.append((result.id_map.object_count, result.id_map.equivalences))
    assert counts[0] == counts[1] == (1, counts[0][1])
    assert 0 < counts[0][1] <= 3 * 16  # at most the face voxels the cube has on seams


def test_misaligned_core_and_stale_id_map_are_refused() -> None:
    prob = smooth_field((8, 16, 16), seed=1)
    target = memory_array(prob, (4, 8, 8), dtype="uint32")
    result = label_sharded(prob, target, LabelSpec())
    labelling = Labelling("probability")
    with pytest.raises(InvalidArgumentError) as caught:
        relabel_block(prob, target, (0, 0, 0), Box((0, 0, 0), (4, 4, 8)), result.id_map, labelling)
    assert caught.value.field == "block.core"
    changed = np.where(prob > 0.5, 0.0, 1.0).astype(np.float32)  # a different labelling
    with pytest.raises(FailedPreconditionError, match="pieces"):
        for block in plan_blocks(prob.shape, (4, 8, 8)):
            relabel_block(changed, target, block.index, block.core, result.id_map, labelling)
    with pytest.raises(InvalidArgumentError) as caught:
        Labelling("probability", connectivity=4)
    assert caught.value.field == "connectivity"
    with pytest.raises(InvalidArgumentError) as caught:
        Labelling("probability", watershed_h=0.0)
    assert caught.value.field == "watershed_h"


def test_tables_in_parquet_and_csv_with_units(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path}")
    prob = smooth_field((6, 24, 24), seed=3)
    target = memory_array(prob, (3, 8, 8), dtype="uint32")
    stats = label_sharded(prob, target, LabelSpec(), voxel_size_nm=(30.0, 4.0, 4.0)).objects
    csv_key, parquet_key = write_object_tables(store, "volumes/p.zarr/labels/seg", stats)
    assert (csv_key, parquet_key) == table_keys("volumes/p.zarr/labels/seg")
    assert parquet_key == "volumes/p.seg.objects.parquet"
    table = pq.read_table(io.BytesIO(store.read_bytes(parquet_key)))
    assert tuple(table.column_names) == COLUMNS
    assert table.num_rows == len(stats) > 0
    np.testing.assert_allclose(table.column("volume_nm3").to_numpy(), stats.volume_nm3)
    assert table.schema.field("label").type == "int64"
    assert table.schema.metadata[b"voxel_size_nm"] == b"30.0,4.0,4.0"
    lines = store.read_bytes(csv_key).decode().splitlines()
    assert lines[0].split(",") == list(COLUMNS) and len(lines) == len(stats) + 1
    first = dict(zip(COLUMNS, lines[1].split(","), strict=True))
    assert int(first["label"]) == stats.labels[0]
    assert float(first["centroid_z_nm"]) == pytest.approx(stats.centroid_nm[0, 0])


def test_stored_tasks_survive_a_killed_worker(tmp_path: Path) -> None:
    """Tasks through store documents, in any order, some run twice (a worker killed
    after writing, its task leased again): the result equals scipy's."""
    store = Store(f"file://{tmp_path / 'store'}")
    prob = smooth_field((10, 30, 26), seed=9)
    source = write_volume(store, "volumes/p.zarr", prob, (4, 8, 8), voxel_size_nm=(40, 8, 8))
    target = store.create_volume(
        "volumes/l.zarr", prob.shape, "uint32", chunk_shape=(4, 8, 8), voxel_size_nm=(40, 8, 8)
    )
    docs = Documents(store, "jobs/j1/labels")
    labelling = Labelling("probability", 0.55, 1)
    plan = plan_blocks(prob.shape, (4, 8, 8))
    blocks = list(plan)
    order = np.random.default_rng(0).permutation(len(blocks))
    retried = [blocks[i] for i in order[: len(blocks) // 3]]
    for block in [blocks[i] for i in order] + retried:
        summarize_task(docs, source, block.index, block.core, labelling)
    for block in retried + [blocks[i] for i in order]:
        equivalences_task(docs, block.index, plan.grid_shape, 1)
    merge_task(docs, plan.grid_shape)
    first = store.read_bytes(docs.id_map_key)
    merge_task(docs, plan.grid_shape)
    assert store.read_bytes(docs.id_map_key) == first
    for block in [blocks[i] for i in order] + retried:
        relabel_task(docs, source, target, block.index, block.core, labelling)
    stats, outputs = reduce_task(
        docs, plan.grid_shape, (40, 8, 8), labels_store=store, labels_path="volumes/l.zarr",
        volume=Box.from_shape(prob.shape), window_um=0.3,
    )  # fmt: skip
    want, n = ndimage.label(prob >= 0.55)
    assert len(stats) == n
    assert same_partition(np.asarray(target[...]), want)
    assert outputs["objects_parquet"] == "volumes/l.objects.parquet"
    assert all(store.exists(key) for key in outputs.values())
    for k in (2, 0, 1, 0):  # the table in three shards, one reduced twice
        reduce_part_task(docs, plan.grid_shape, (40, 8, 8), (k, 3))
    joined, _ = reduce_task(
        docs, plan.grid_shape, (40, 8, 8), labels_store=store, labels_path="volumes/l.zarr",
        volume=Box.from_shape(prob.shape), shards=3,
    )  # fmt: skip
    for name, column in stats.columns().items():
        np.testing.assert_array_equal(joined.columns()[name], column)


def test_reduce_shards_join_to_the_whole_table() -> None:
    prob = smooth_field((8, 30, 30), seed=6)
    labelling = Labelling("probability", 0.55, 1)
    plan = plan_blocks(prob.shape, (4, 8, 8))
    summaries = [summarize_block(prob, b.index, b.core, labelling) for b in plan]
    faces = {s.faces.index: s.faces for s in summaries}
    pairs = [equivalences_among(faces, b.index, plan.grid_shape, 1) for b in plan]
    id_map = merge_pieces([s.pieces.counts for s in summaries], pairs, plan.grid_shape)
    pieces = [s.pieces for s in summaries]
    whole = reduce_objects(pieces, id_map, (1, 1, 1))
    parts = [reduce_objects(pieces, id_map, (1, 1, 1), shard=(k, 3)) for k in range(3)]
    assert sum(len(p) for p in parts) == len(whole) > 3
    assert all(set(((p.labels - 1) % 3).tolist()) <= {k} for k, p in enumerate(parts))
    joined = concat_tables(parts)
    for name, column in whole.columns().items():
        np.testing.assert_array_equal(joined.columns()[name], column)
    with pytest.raises(InvalidArgumentError) as caught:
        concat_tables([parts[0], parts[0]])
    assert caught.value.field == "parts"
    with pytest.raises(InvalidArgumentError) as caught:
        reduce_objects(pieces, id_map, (1, 1, 1), shard=(3, 3))
    assert caught.value.field == "shard"


@pytest.mark.data
def test_real_mitochondria_match_scipy_and_numpy(data_dir: Path) -> None:
    """The cdeep3m-mito training masks, sharded in blocks of 8 x 256 x 256 (clipped in z)."""
    folder = data_dir / "cdeep3m-mito" / "training" / "labels"
    mask = np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]) > 0
    mask = mask[:, :512, :512]  # keeps the test short; still 3 x 2 x 2 blocks
    target = np.zeros(mask.shape, np.uint32)
    voxel = (40.0, 6.0, 6.0)
    result = label_sharded(
        mask.astype(np.uint8), target, LabelSpec(), voxel_size_nm=voxel, block_shape=(8, 256, 256)
    )
    want, n = ndimage.label(mask)
    assert n > 10 and result.id_map.object_count == n
    assert same_partition(target, want)
    table = result.objects
    sizes = ndimage.sum_labels(np.ones_like(want), target, index=table.labels)
    np.testing.assert_array_equal(table.volume_voxels, sizes)
    centroids = np.array(ndimage.center_of_mass(np.ones_like(want), target, table.labels))
    np.testing.assert_allclose(table.centroid, centroids, rtol=1e-9)


def two_touching_spheres() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shape = (36, 40, 64)
    z, y, x = np.indices(shape)
    a = (z - 18) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 11**2
    b = (z - 18) ** 2 + (y - 20) ** 2 + (x - 40) ** 2 <= 11**2
    return a, b, (a | b).astype(np.float32)


@pytest.mark.parametrize("chunks", [(18, 20, 30), (12, 16, 16)])
def test_watershed_splits_touching_spheres_across_blocks(chunks: tuple[int, int, int]) -> None:
    a, b, prob = two_touching_spheres()
    spec = LabelSpec(watershed=True, watershed_halo=(12, 16, 16))
    sharded = memory_array(prob, chunks, dtype="uint32")
    result = label_sharded(prob, sharded, spec)
    got = np.asarray(sharded[...])
    assert result.id_map.object_count == 2 == len(result.objects)
    only_a, only_b = np.unique(got[a & ~b]), np.unique(got[b & ~a])
    assert len(only_a) == 1 and len(only_b) == 1 and only_a[0] != only_b[0]
    whole = memory_array(prob, chunks, dtype="uint32")
    label_array(prob, whole, spec)
    assert same_partition(got, np.asarray(whole[...]))  # the blockwise watershed, sharded


@pytest.mark.parametrize("connectivity", [1, 3])
def test_watershed_equals_blockwise_label_array(connectivity: int) -> None:
    prob = smooth_field((12, 40, 40), seed=21, sigma=2.0)
    spec = LabelSpec(
        threshold=0.45, connectivity=connectivity, watershed=True, watershed_h=1.0,
        watershed_halo=(2, 6, 6), min_size_voxels=3,
    )  # fmt: skip
    sharded = memory_array(prob, (4, 16, 16), dtype="uint32")
    whole = memory_array(prob, (4, 16, 16), dtype="uint32")
    result = label_sharded(prob, sharded, spec, voxel_size_nm=(20, 10, 10))
    reference = label_array(prob, whole, spec, voxel_size_nm=(20, 10, 10))
    assert result.id_map.object_count == reference.object_count
    assert same_partition(np.asarray(sharded[...]), np.asarray(whole[...]))
    plain = label_sharded(prob, memory_array(prob, (4, 16, 16), dtype="uint32"),
                          LabelSpec(threshold=0.45, connectivity=connectivity))  # fmt: skip
    assert result.id_map.object_count > plain.id_map.object_count  # something was split


RELABEL_WORKER = """
import sys
from deep3m.core.geometry import plan_blocks
from deep3m.core.store import Store
from deep3m.postprocess.sharded.block import Labelling
from deep3m.postprocess.sharded.stored import Documents, relabel_task

store = Store(sys.argv[1])
source = store.open_volume("volumes/p.zarr")
target = store.open_volume("volumes/l.zarr", mode="r+", require_complete=False)
docs = Documents(store, "jobs/j/labels")
for block in plan_blocks(source.shape, (4, 8, 8)):
    relabel_task(docs, source, target, block.index, block.core, Labelling("probability"))
    print(block.id, flush=True)
"""


@pytest.mark.slow
def test_a_worker_killed_mid_relabel_changes_nothing(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path / 'store'}")
    prob = smooth_field((16, 48, 48), seed=13)
    source = write_volume(store, "volumes/p.zarr", prob, (4, 8, 8))
    plan = plan_blocks(prob.shape, (4, 8, 8))
    docs = Documents(store, "jobs/j/labels")
    labelling = Labelling("probability")
    for block in plan:
        summarize_task(docs, source, block.index, block.core, labelling)
    for block in plan:
        equivalences_task(docs, block.index, plan.grid_shape, 1)
    merge_task(docs, plan.grid_shape)
    clean = store.create_volume("volumes/clean.zarr", prob.shape, "uint32", chunk_shape=(4, 8, 8))
    for block in plan:
        relabel_task(docs, source, clean, block.index, block.core, labelling)
    target = store.create_volume("volumes/l.zarr", prob.shape, "uint32", chunk_shape=(4, 8, 8))
    with subprocess.Popen(
        [sys.executable, "-c", RELABEL_WORKER, store.url], stdout=subprocess.PIPE, text=True
    ) as worker:
        assert worker.stdout is not None
        done = [worker.stdout.readline() for _ in range(len(plan) // 3)]
        worker.send_signal(signal.SIGKILL)  # mid-stage: a third of the blocks reported
        worker.wait(timeout=60)
    assert worker.returncode == -signal.SIGKILL and all(d.strip() for d in done)
    for block in plan:  # every task leased again, including those already done
        relabel_task(docs, source, target, block.index, block.core, labelling)
    got = np.asarray(target[...])
    np.testing.assert_array_equal(got, np.asarray(clean[...]))
    assert same_partition(got, ndimage.label(prob >= 0.5)[0])


def test_stored_watershed_tasks_split_touching_spheres(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path / 'store'}")
    _, _, prob = two_touching_spheres()
    spec = LabelSpec(watershed=True, watershed_halo=(12, 16, 16))
    labelling = labelling_for(spec, "probability", (1, 1, 1))
    plan = plan_blocks(prob.shape, (18, 20, 30))
    docs = Documents(store, "jobs/w/labels")
    for block in plan:
        summarize_task(docs, prob, block.index, block.core, labelling)
    for block in plan:
        equivalences_task(docs, block.index, plan.grid_shape, spec.connectivity)
    assert merge_task(docs, plan.grid_shape, watershed=True).object_count == 2
    target = np.zeros(prob.shape, np.uint32)
    for block in plan:
        relabel_task(docs, prob, target, block.index, block.core, labelling)
    reference = np.zeros(prob.shape, np.uint32)
    label_sharded(prob, reference, spec, block_shape=(18, 20, 30))
    np.testing.assert_array_equal(target, reference)


def test_documents_round_trip_every_dtype_and_shape_and_read_npz_too() -> None:
    arrays = {
        "ids": np.arange(7, dtype=np.uint32),
        "boxes": np.arange(24, dtype=np.int64).reshape(4, 2, 3),
        "sums": np.linspace(0, 1, 5),
        "flags": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.int64),
        "scalar": np.asarray(2.5, np.float32),
        "strided": np.arange(10, dtype=np.int16)[::3],
    }
    got = from_document_bytes(to_document_bytes(arrays), "test")
    assert list(got) == list(arrays)
    for name, array in arrays.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    legacy = from_document_bytes(buf.getvalue(), "test")
    assert all(np.array_equal(legacy[n], a) for n, a in arrays.items())


@pytest.mark.parametrize("cut", [10, 30, -8])
def test_a_truncated_document_is_a_clear_error(cut: int) -> None:
    import numcodecs

    raw = numcodecs.Zstd().decode(to_document_bytes({"ids": np.arange(50, dtype=np.int64)}))
    with pytest.raises(FailedPreconditionError, match="piece statistics document is unreadable"):
        from_document_bytes(bytes(raw)[:cut], "piece statistics")


def test_object_arrays_are_refused_when_a_document_is_written() -> None:
    with pytest.raises(InvalidArgumentError, match="'names' of a document holds objects"):
        to_document_bytes({"names": np.array(["a", None], dtype=object)})
