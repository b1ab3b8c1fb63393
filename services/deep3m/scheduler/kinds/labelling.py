"""The sharded labelling stages a job runs on the postprocess workers.

Both ``label`` jobs and ``predict`` jobs with ``postprocess`` run them, after
their own stages: ``summarize`` (per block: threshold, local components, face
and piece documents) → ``equivalences`` (per block: pairs across its upper
seams) → ``merge`` (once: the global id map; the pyramid's empty levels
created) → ``relabel`` (per block: the label chunks; the first tasks also
reduce the object table's shards, which need only the id map and the piece
documents, and where the level-1 regions are the blocks downsampled each task
writes its region of level 1 from memory) → ``pyramid_1`` (or ``pyramid_2``)
… ``pyramid_L`` (per chunk-aligned region of each level: level n from level
n - 1, labels by mode, probabilities by mean) → ``reduce`` (once: the tables
joined, the label image sealed, the multiscales metadata recorded) → with a
ground truth, ``evaluate_blocks`` (per block: voxel counts and object points;
the ground truth's components are found by the first three stages beside the
prediction's) and ``evaluate`` (once). Stages that need not wait for each
other share tasks, so each hand-over between stages (and the idle tail of a
stage of few tasks) is paid once. Blocks lie on the labels volume's write
grid, so each task writes chunks no other task touches. The stages' documents
are deleted once the last one is done.
"""

from __future__ import annotations

from collections.abc import Sequence

from deep3m.core.errors import AlreadyExistsError, InvalidArgumentError
from deep3m.core.geometry import plan_blocks
from deep3m.core.levels import Level, level_block, level_one_in_blocks, plan_levels
from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store, VolumeInfo
from deep3m.core.store.keys import labelling_documents
from deep3m.scheduler.kinds.base import KindContext, NewVolume, VolumeFacts, replace_repeated
from deep3m.scheduler.kinds.refs import check_same_array, facts, input_volume, shape3
from deep3m.scheduler.stages import StageDef, StagePlan
from deep3m.v1 import common_pb2

ROLE = "postprocess"
LABELLING_STAGES: tuple[StageDef, ...] = tuple(
    StageDef(name, ROLE) for name in ("summarize", "equivalences", "merge", "relabel", "reduce")
)
# With ground truth, after ``reduce``: per block counts, then their reduction.
EVALUATION_STAGES: tuple[StageDef, ...] = (
    StageDef("evaluate_blocks", ROLE),
    StageDef("evaluate", ROLE),
)
PER_BLOCK = frozenset({"summarize", "equivalences", "relabel", "evaluate_blocks"})
MAX_EXCLUSION_ZONE_VOXELS = 1024
# Level n of the pyramid (1..), one task per chunk-aligned region of the level.
PYRAMID_LEVEL_STAGE = "pyramid_{}"
LABELS_DTYPE = "uint32"
DEFAULT_LABEL_NAME = "segmentation"
DEFAULT_THRESHOLD = 0.5
# Each part re-reads every block's piece statistics: a few parts spread the
# reduction without multiplying those reads much. At least 4, so two workers
# leasing two tasks at a time both get some. Part k is reduced by the relabel
# task of block k (mod the blocks): those are leased first, so the parts run
# beside the other blocks' relabelling instead of after it.
MIN_TABLE_SHARDS = 4
MAX_TABLE_SHARDS = 8
BLOCKS_PER_TABLE_SHARD = 64


def table_shards(n_blocks: int) -> int:
    return max(MIN_TABLE_SHARDS, min(MAX_TABLE_SHARDS, -(-n_blocks // BLOCKS_PER_TABLE_SHARD)))


def resolve_labelling(
    given: common_pb2.LabelSpec,
    *,
    shape: Sequence[int],
    grid: Sequence[int],
    default_block: Sequence[int],
    prefix: str = "",
) -> common_pb2.LabelSpec:
    """``given`` with defaults filled in and every number checked; fields named ``prefix``+name."""
    out = common_pb2.LabelSpec()
    out.CopyFrom(given)
    out.threshold = given.threshold or DEFAULT_THRESHOLD
    if not 0.0 < out.threshold <= 1.0:
        raise InvalidArgumentError(
            f"threshold must lie in (0, 1], got {given.threshold}", field=f"{prefix}threshold"
        )
    out.connectivity = given.connectivity or 1
    if out.connectivity not in (1, 2, 3):
        raise InvalidArgumentError(
            f"connectivity must be 1, 2 or 3, got {given.connectivity}",
            field=f"{prefix}connectivity",
        )
    if not 0 <= given.min_size_voxels <= 10**15:
        raise InvalidArgumentError(
            f"min_size_voxels must be 0..10^15, got {given.min_size_voxels}",
            field=f"{prefix}min_size_voxels",
        )
    out.name = given.name or DEFAULT_LABEL_NAME
    if "/" in out.name or out.name in (".", ".."):
        raise InvalidArgumentError(
            f"label name {out.name!r} must be one path segment", field=f"{prefix}name"
        )
    block = (
        shape3(given.block_shape, f"{prefix}block_shape", minimum=1)
        if given.block_shape
        else tuple(default_block)
    )
    plan = plan_blocks(shape, block, (0, 0, 0), grid=grid)  # names block_shape when misaligned
    replace_repeated(out.block_shape, block)
    if not 0 <= given.table_shards <= 1024:
        raise InvalidArgumentError(
            f"table_shards must be 0..1024, got {given.table_shards}",
            field=f"{prefix}table_shards",
        )
    out.table_shards = given.table_shards or table_shards(len(plan))
    return out


def resolve_ground_truth(
    roots: StoreRoots, spec: common_pb2.LabelSpec, shape: Sequence[int], *, prefix: str = ""
) -> VolumeFacts | None:
    """The ground truth an evaluating labelling reads (None without one), checked:
    complete, and the labels' shape; the exclusion zone in range."""
    zone = spec.exclusion_zone_voxels
    if not 0 <= zone <= MAX_EXCLUSION_ZONE_VOXELS:
        raise InvalidArgumentError(
            f"exclusion_zone_voxels must be 0..{MAX_EXCLUSION_ZONE_VOXELS}, got {zone}",
            field=f"{prefix}exclusion_zone_voxels",
        )
    if not spec.ground_truth.path:
        if zone:
            raise InvalidArgumentError(
                "exclusion_zone_voxels needs a ground_truth to evaluate against",
                field=f"{prefix}exclusion_zone_voxels",
            )
        return None
    name = f"{prefix}ground_truth"
    store, key, info = input_volume(roots, spec.ground_truth, name)
    if tuple(info.shape) != tuple(shape):
        raise InvalidArgumentError(
            f"ground truth {store.key_url(key)} has shape {list(info.shape)}, the labels "
            f"{list(shape)}",
            field=name,
        )
    return facts(store, key, spec.ground_truth.array, info)


def labels_volume(
    store: Store,
    key: str,
    existing: VolumeInfo | None,
    *,
    shape: Sequence[int],
    chunk_shape: Sequence[int],
    shard_shape: Sequence[int] | None,
    voxel_size_nm: Sequence[float],
    source: str,
    field: str,
) -> tuple[tuple[NewVolume, ...], VolumeFacts]:
    """The labels volume a job writes: created at submit, or an identical earlier one reused."""
    grid = tuple(int(g) for g in (shard_shape or chunk_shape))
    new: tuple[NewVolume, ...] = ()
    if existing is not None:
        if existing.attributes.get("kind") != "labels":
            raise AlreadyExistsError(
                f"{store.key_url(key)} exists and is not a labels volume; choose another output",
                field=field,
            )
        check_same_array(
            store, key, existing, field, shape=shape, dtype=LABELS_DTYPE,
            chunks=chunk_shape, shards=shard_shape,
        )  # fmt: skip
    else:
        new = (
            NewVolume(
                store, key, tuple(shape), LABELS_DTYPE, tuple(voxel_size_nm),
                tuple(chunk_shape), tuple(shard_shape) if shard_shape else None,
                attributes={"kind": "labels", "source": source},
            ),
        )  # fmt: skip
    facts = VolumeFacts(
        store.url, key, "", tuple(int(s) for s in shape), LABELS_DTYPE, grid,
        tuple(float(v) for v in voxel_size_nm),
    )  # fmt: skip
    return new, facts


def pyramid_levels(labels: VolumeFacts) -> list[Level]:
    """The pyramid levels 1.. the labelling writes (of the labels, and of a predict
    job's probabilities, which share their shape, grid and voxel size)."""
    return plan_levels(labels.shape, labels.voxel_size_nm)


def first_pyramid_level(labels: VolumeFacts, spec: common_pb2.LabelSpec) -> int:
    """The first level a ``pyramid_n`` stage writes: 2 where each relabel task writes
    its block's region of level 1 (the regions are the blocks downsampled), else 1."""
    levels = pyramid_levels(labels)
    block = [int(b) for b in spec.block_shape]
    return 2 if level_one_in_blocks(labels.shape, block, levels, labels.grid) else 1


def labelling_stages(labels: VolumeFacts, spec: common_pb2.LabelSpec) -> tuple[StageDef, ...]:
    levels = pyramid_levels(labels)
    first = first_pyramid_level(labels, spec)
    *before, reduce = LABELLING_STAGES
    return (
        *before,
        *(StageDef(PYRAMID_LEVEL_STAGE.format(n), ROLE) for n in range(first, len(levels) + 1)),
        reduce,
        *(EVALUATION_STAGES if spec.ground_truth.path else ()),
    )


def finish_labelling(
    plan: StagePlan,
    first: int,
    labels: VolumeFacts,
    spec: common_pb2.LabelSpec,
    ctx: KindContext,
    job_id: str,
) -> None:
    """After the last labelling stage (the job has succeeded): its documents go.

    Until then they stay, so a restarted scheduler can resume any stage; once the
    last stage is sealed no task will read them again (a restart that repeats this
    step deletes nothing twice)."""
    if plan.index == first + len(labelling_stages(labels, spec)) - 1:
        ctx.roots.store().delete(labelling_documents(job_id))


def plan_labelling(
    index: int, first: int, labels: VolumeFacts, spec: common_pb2.LabelSpec
) -> StagePlan | None:
    """Stage ``index`` of a job whose labelling stages start at index ``first``."""
    stages = labelling_stages(labels, spec)
    k = index - first
    if not 0 <= k < len(stages):
        return None
    sdef = stages[k]
    block = [int(b) for b in spec.block_shape]
    if sdef.name in PER_BLOCK:
        params = {"volume_shape": list(labels.shape), "block_shape": block, "halo": [0, 0, 0]}
        return StagePlan(index, sdef.name, sdef.role, "blocks", params)
    if sdef.name.startswith("pyramid_"):
        levels = pyramid_levels(labels)
        n = int(sdef.name.removeprefix("pyramid_"))
        params = {
            "volume_shape": list(levels[n - 1].shape),
            "block_shape": level_block(block, n, levels, labels.grid),
            "halo": [0, 0, 0],
        }
        return StagePlan(index, sdef.name, sdef.role, "blocks", params)
    return StagePlan(index, sdef.name, sdef.role, "single")
