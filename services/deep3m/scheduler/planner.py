"""Job kinds, submit-time validation, and stage plans.

A job kind is a table of stages; each stage runs on one worker role. Stages
are planned lazily: a stage's tasks are created when the previous stage has
finished, from what exists then (predict blocks come from the input volume's
shape). A stage plan is a *formula* — the block grid, the z-ranges, the member
list — so a million-block stage is a few numbers, and task ``n`` is computed
on demand with a deterministic id ``<stage>/<block id>`` (``predict/b0-1-2``).

``Planner.validate`` checks a spec before any task or output exists and fills
in the defaults (the *resolved* spec that workers receive); every error names
the offending field. ``Planner.create_outputs`` then creates the output volume.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from deep3m.core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from deep3m.core.geometry import Block, BlockPlan, Box, plan_blocks
from deep3m.core.locations import StoreRoots
from deep3m.core.store import DEFAULT_CHUNK_SHAPE, Store, VolumeInfo
from deep3m.v1 import common_pb2

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# CDeep3M tiles slices at 1024²; with a 32-voxel halo that keeps re-computed context
# under 15 % of the work, which is what makes blockwise prediction pay off.
DEFAULT_BLOCK_SHAPE: tuple[int, int, int] = (8, 1024, 1024)
DEFAULT_THRESHOLD = 0.5
ARCHITECTURES = ("deepem3d", "resunet2d", "resunet3d")
DEFAULT_MEMBERS: Mapping[str, tuple[str, ...]] = {
    "deepem3d": ("1fm", "3fm", "5fm"),
    "resunet2d": ("1fm",),
    "resunet3d": ("1fm",),
}
_MEMBER_NAME = re.compile(r"^([1-9][0-9]?)fm$")
PROBABILITY_DTYPE = "float32"


@dataclass(frozen=True)
class StageDef:
    name: str
    role: str


JOB_KINDS: Mapping[str, tuple[StageDef, ...]] = {
    "ingest": (StageDef("ingest", "tiling"), StageDef("finalize", "tiling")),
    "predict": (StageDef("predict", "inference"), StageDef("finalize", "postprocess")),
    "train": (StageDef("train", "training"), StageDef("finalize", "training")),
}


def check_job_id(job_id: str) -> str:
    if not JOB_ID.match(job_id):
        raise InvalidArgumentError(
            f"job id {job_id!r} must be 1–64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
            field="job_id",
        )
    return job_id


def job_kind(spec: common_pb2.JobSpec) -> str:
    kind = spec.WhichOneof("kind")
    if kind is None:
        raise InvalidArgumentError(
            "the job spec names no kind: set predict, train or ingest", field="spec"
        )
    return str(kind)


@dataclass(frozen=True)
class TaskSpec:
    """One task, computed from its stage plan."""

    number: int
    id: str
    block: Block | None = None
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StagePlan:
    """The tasks of one stage as a formula. ``layout`` selects the formula:

    - ``blocks``: ``params`` volume_shape, block_shape, halo → one task per core block;
    - ``zranges``: volume_shape, slices → one task per z-range (whole y, x);
    - ``members``: members → one task per ensemble member;
    - ``single``: one task.
    """

    index: int
    name: str
    role: str
    layout: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layout not in ("blocks", "zranges", "members", "single"):
            raise InvalidArgumentError(f"unknown stage layout {self.layout!r}", field="layout")

    # Cached: a lease or completion computes one task, and must not redo the grid.
    @cached_property
    def block_plan(self) -> BlockPlan:
        return BlockPlan(
            tuple(self.params["volume_shape"]),
            tuple(self.params["block_shape"]),
            tuple(self.params["halo"]),
        )

    @cached_property
    def _grid(self) -> tuple[int, ...]:
        return tuple(int(g) for g in self.block_plan.grid_shape)

    @cached_property
    def n_tasks(self) -> int:
        if self.layout == "blocks":
            return len(self.block_plan)
        if self.layout == "zranges":
            return -(-int(self.params["volume_shape"][0]) // int(self.params["slices"]))
        if self.layout == "members":
            return len(self.params["members"])
        return 1

    def task(self, n: int) -> TaskSpec:
        if not 0 <= n < self.n_tasks:
            raise InvalidArgumentError(
                f"task number {n} outside 0..{self.n_tasks - 1} of stage {self.name!r}",
                field="task",
            )
        if self.layout == "blocks":
            _, gy, gx = self._grid
            block = self.block_plan.block_at((n // (gy * gx), (n // gx) % gy, n % gx))
            return TaskSpec(n, f"{self.name}/{block.id}", block)
        if self.layout == "zranges":
            shape = [int(s) for s in self.params["volume_shape"]]
            slices = int(self.params["slices"])
            z0, z1 = n * slices, min((n + 1) * slices, shape[0])
            core = Box((z0, 0, 0), (z1, shape[1], shape[2]))
            block = Block((n, 0, 0), core, core)
            return TaskSpec(
                n, f"{self.name}/{block.id}", block, {"z_start": str(z0), "z_stop": str(z1)}
            )
        if self.layout == "members":
            member = str(self.params["members"][n])
            return TaskSpec(n, f"{self.name}/{member}", None, {"member": member})
        return TaskSpec(0, f"{self.name}/0")

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "role": self.role,
            "layout": self.layout,
            "params": dict(self.params),
            "n_tasks": self.n_tasks,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StagePlan:
        try:
            return cls(
                int(data["index"]),
                str(data["name"]),
                str(data["role"]),
                str(data["layout"]),
                dict(data.get("params", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f"invalid stage plan {data!r}: {exc}", field="stage"
            ) from exc


@dataclass(frozen=True)
class NewVolume:
    """An output volume the job creates at submit."""

    store: Store
    key: str
    shape: tuple[int, ...]
    dtype: str
    voxel_size_nm: tuple[float, ...]
    chunk_shape: tuple[int, ...]
    shard_shape: tuple[int, ...] | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedJob:
    """A validated spec with its defaults filled in, and the outputs to create."""

    kind: str
    resolved: common_pb2.JobSpec
    outputs: Mapping[str, str]
    volumes: tuple[NewVolume, ...] = ()


def _shape(values: Sequence[int], name: str, *, minimum: int, ndim: int = 3) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if len(out) != ndim or any(v < minimum for v in out):
        raise InvalidArgumentError(
            f"{name} must be {ndim} values (z, y, x) >= {minimum}, got {list(out)}", field=name
        )
    return out


def _with_field(exc: Exception, name: str) -> Exception:
    """Re-raise a store error under the spec field that referenced the volume."""
    if isinstance(exc, NotFoundError | InvalidArgumentError | FailedPreconditionError):
        return type(exc)(exc.message, field=name)
    return exc


def chunk_for_block(block: Sequence[int]) -> tuple[int, ...]:
    """Output chunks for a block: the default chunk where it divides the block, else the block.

    So each block is a whole number of chunks and no two tasks share one.
    """
    return tuple(c if b % c == 0 else b for b, c in zip(block, DEFAULT_CHUNK_SHAPE, strict=True))


def fit_to_grid(block: Sequence[int], shape: Sequence[int], grid: Sequence[int]) -> tuple[int, ...]:
    """``block`` no larger than the volume rounded up to whole grid cells (stays aligned)."""
    return tuple(min(b, -(-s // g) * g) for b, s, g in zip(block, shape, grid, strict=True))


def default_block(shape: Sequence[int], grid: Sequence[int]) -> tuple[int, ...]:
    """The default block rounded down to the grid (at least one cell), fitted to the volume."""
    return fit_to_grid(
        tuple(max(g, (d // g) * g) for g, d in zip(grid, DEFAULT_BLOCK_SHAPE, strict=True)),
        shape,
        grid,
    )


class Planner:
    """Validates specs, creates outputs, plans stages. Stateless apart from the roots."""

    def __init__(
        self,
        roots: StoreRoots,
        *,
        max_region_voxels: int = 64 * 1024 * 1024,
        restrict_local_inputs: bool = False,
    ) -> None:
        self.roots = roots
        self.max_region_voxels = max_region_voxels
        self.restrict_local_inputs = restrict_local_inputs

    # -- volumes ------------------------------------------------------------
    def _volume(self, ref: common_pb2.VolumeRef, name: str) -> tuple[Store, str, VolumeInfo]:
        store, key = self.roots.resolve(ref.store_url, ref.path, field=name)
        try:
            info = store.volume_info(key, ref.array)
        except Exception as exc:
            raise _with_field(exc, name) from exc
        if not info.complete:
            raise FailedPreconditionError(
                f"{name} volume {store.key_url(key)} is incomplete (still being written, or its "
                "writer failed)",
                field=name,
            )
        if len(info.shape) != 3:
            raise InvalidArgumentError(
                f"{name} volume {store.key_url(key)} has {len(info.shape)} axes; expected z, y, x",
                field=name,
            )
        return store, key, info

    def _output(self, ref: common_pb2.VolumeRef, name: str) -> tuple[Store, str, VolumeInfo | None]:
        """The output location, and what it already holds (None when free)."""
        store, key = self.roots.resolve(ref.store_url, ref.path, field=name)
        if ref.array not in ("", "0"):
            raise InvalidArgumentError(
                f"{name}.array must be empty (the full-resolution array '0'), got {ref.array!r}",
                field=f"{name}.array",
            )
        if store.exists(f"{key}/zarr.json"):
            try:
                return store, key, store.volume_info(key)
            except NotFoundError as exc:
                raise AlreadyExistsError(
                    f"{name} path {store.key_url(key)} already holds something that is not a "
                    "deep3m volume; choose another output path",
                    field=name,
                ) from exc
        if store.exists(key):
            raise AlreadyExistsError(
                f"{name} path {store.key_url(key)} already exists and is not a volume; choose "
                "another output path",
                field=name,
            )
        return store, key, None

    @staticmethod
    def _same_array(
        store: Store,
        key: str,
        info: VolumeInfo,
        name: str,
        *,
        shape: Sequence[int],
        dtype: str,
        chunks: Sequence[int] | None = None,
        shards: Sequence[int] | None = None,
    ) -> None:
        differs = [
            f"shape {list(info.shape)} (need {list(shape)})"
            if tuple(info.shape) != tuple(shape)
            else "",
            f"dtype {info.dtype} (need {dtype})" if np.dtype(info.dtype) != np.dtype(dtype) else "",
            f"chunks {list(info.chunk_shape)} (need {list(chunks)})"
            if chunks is not None and tuple(info.chunk_shape) != tuple(chunks)
            else "",
            f"shards {list(info.shard_shape or ())} (need {list(shards or ())})"
            if chunks is not None and tuple(info.shard_shape or ()) != tuple(shards or ())
            else "",
        ]
        problems = [d for d in differs if d]
        if problems:
            raise AlreadyExistsError(
                f"{name} {store.key_url(key)} already holds a different array: "
                + "; ".join(problems)
                + ". Choose another output path or remove it",
                field=name,
            )

    # -- validation -----------------------------------------------------------
    def validate(self, spec: common_pb2.JobSpec) -> PreparedJob:
        kind = job_kind(spec)
        if not 0 <= spec.max_attempts <= 100:
            raise InvalidArgumentError(
                f"max_attempts must be 0..100, got {spec.max_attempts}", field="max_attempts"
            )
        if kind == "predict":
            return self._validate_predict(spec)
        if kind == "ingest":
            return self._validate_ingest(spec)
        return self._validate_train(spec)

    def _validate_predict(self, spec: common_pb2.JobSpec) -> PreparedJob:
        from deep3m.core.augmentation import IDENTITY_LEVEL, SPEED_LEVELS
        from deep3m.models.card import check_model_id, load_card

        p = spec.predict
        check_model_id(p.model)
        card = load_card(self.roots.store(), p.model)
        members = tuple(p.members) or card.member_names
        if len(set(members)) != len(members):
            raise InvalidArgumentError(f"members {list(members)} repeat a name", field="members")
        frames = max(card.member(m).frames for m in members)
        tta_level = p.tta_level or IDENTITY_LEVEL
        if tta_level not in SPEED_LEVELS:
            raise InvalidArgumentError(
                f"tta_level must be one of {sorted(SPEED_LEVELS)}, got {p.tta_level}",
                field="tta_level",
            )

        in_store, in_key, info = self._volume(p.input, "input")
        shape = tuple(info.shape)
        halo = _shape(p.halo, "halo", minimum=0) if p.halo else tuple(card.halo)
        if halo[0] < frames // 2:
            raise InvalidArgumentError(
                f"halo {list(halo)} is too small in z: {frames}-frame members need {frames // 2} "
                "slices of context on each side",
                field="halo",
            )
        out_store, out_key, existing = self._output(p.output, "output")
        if (out_store.url, out_key) == (in_store.url, in_key):
            raise InvalidArgumentError(
                f"output {out_store.key_url(out_key)} is the input volume", field="output"
            )
        requested = _shape(p.block_shape, "block_shape", minimum=1) if p.block_shape else None
        volumes: tuple[NewVolume, ...] = ()
        if existing is not None:
            self._same_array(
                out_store, out_key, existing, "output", shape=shape, dtype=PROBABILITY_DTYPE
            )
            grid = tuple(existing.shard_shape or existing.chunk_shape)
            block = fit_to_grid(requested, shape, grid) if requested else default_block(shape, grid)
        else:
            block = tuple(
                min(b, s) for b, s in zip(requested or DEFAULT_BLOCK_SHAPE, shape, strict=True)
            )
            grid = chunk_for_block(block)
            volumes = (
                NewVolume(
                    out_store,
                    out_key,
                    shape,
                    PROBABILITY_DTYPE,
                    tuple(info.voxel_size_nm),
                    grid,
                    attributes={
                        "kind": "probabilities",
                        "model": p.model,
                        "input": in_store.key_url(in_key),
                    },
                ),
            )
        plan_blocks(shape, block, halo, grid=grid)  # InvalidArgumentError names block_shape
        read_voxels = math.prod(b + 2 * h for b, h in zip(block, halo, strict=True))
        if read_voxels > self.max_region_voxels:
            raise InvalidArgumentError(
                f"block_shape {list(block)} with halo {list(halo)} reads {read_voxels} voxels per "
                f"task, more than the limit of {self.max_region_voxels}; use smaller blocks",
                field="block_shape",
            )
        threshold = p.threshold
        if p.postprocess:
            threshold = threshold or DEFAULT_THRESHOLD
            if not 0.0 < threshold < 1.0:
                raise InvalidArgumentError(
                    f"threshold must lie in (0, 1), got {p.threshold}", field="threshold"
                )
        resolved = common_pb2.JobSpec()
        resolved.CopyFrom(spec)
        r = resolved.predict
        r.tta_level = tta_level
        r.threshold = threshold
        del r.members[:]
        r.members.extend(members)
        del r.block_shape[:]
        r.block_shape.extend(block)
        del r.halo[:]
        r.halo.extend(halo)
        return PreparedJob(
            "predict", resolved, {"probabilities": out_store.key_url(out_key)}, volumes
        )

    def _check_source(self, source: str) -> None:
        # URLs must lie under a configured root; local paths too when restricted.
        if "://" in source or self.restrict_local_inputs:
            self.roots.check_url(source, field="source")

    def _validate_ingest(self, spec: common_pb2.JobSpec) -> PreparedJob:
        i = spec.ingest
        if not i.source.strip():
            raise InvalidArgumentError("source is empty", field="source")
        self._check_source(i.source)
        if i.voxel_size_nm and (len(i.voxel_size_nm) != 3 or min(i.voxel_size_nm) <= 0):
            raise InvalidArgumentError(
                f"voxel_size_nm must be 3 positive sizes (z, y, x), got {list(i.voxel_size_nm)}",
                field="voxel_size_nm",
            )
        chunks_in = (
            _shape(i.chunk_shape, "chunk_shape", minimum=1)
            if i.chunk_shape
            else DEFAULT_CHUNK_SHAPE
        )
        if i.slices_per_task < 0:
            raise InvalidArgumentError(
                f"slices_per_task must be >= 0, got {i.slices_per_task}", field="slices_per_task"
            )
        out_store, out_key, existing = self._output(i.output, "output")

        from deep3m.core.imageio import open_source

        options = self.roots.store().storage_options if i.source.startswith("s3://") else None
        # Headers are checked here; pixel checksums when the ingest tasks read the data.
        with open_source(i.source, storage_options=options, verify=False) as src:
            shape = tuple(int(s) for s in src.shape)
            dtype = str(src.dtype)
            source_voxel = src.voxel_size_nm
        voxel = tuple(i.voxel_size_nm) or tuple(source_voxel or (1.0, 1.0, 1.0))
        chunks = tuple(min(c, s) for c, s in zip(chunks_in, shape, strict=True))
        shards: tuple[int, ...] | None = None
        if i.shard_shape:
            shards = _shape(i.shard_shape, "shard_shape", minimum=1)
            if any(s % c for s, c in zip(shards, chunks, strict=True)):
                raise InvalidArgumentError(
                    f"shard_shape {list(shards)} must be a multiple of the chunk shape "
                    f"{list(chunks)}",
                    field="shard_shape",
                )
        grid_z = (shards or chunks)[0]
        slices = i.slices_per_task or grid_z
        if slices % grid_z:
            raise InvalidArgumentError(
                f"slices_per_task {slices} must be a multiple of the output's z grid {grid_z} "
                "(chunk or shard depth): tasks would share chunks",
                field="slices_per_task",
            )
        volumes: tuple[NewVolume, ...] = ()
        if existing is not None:
            self._same_array(
                out_store,
                out_key,
                existing,
                "output",
                shape=shape,
                dtype=dtype,
                chunks=chunks,
                shards=shards,
            )
        else:
            volumes = (
                NewVolume(
                    out_store,
                    out_key,
                    shape,
                    dtype,
                    voxel,
                    chunks,
                    shards,
                    {"kind": "image", "source": i.source},
                ),
            )
        resolved = common_pb2.JobSpec()
        resolved.CopyFrom(spec)
        r = resolved.ingest
        del r.voxel_size_nm[:]
        r.voxel_size_nm.extend(voxel)
        del r.chunk_shape[:]
        r.chunk_shape.extend(chunks)
        r.slices_per_task = slices
        return PreparedJob("ingest", resolved, {"volume": out_store.key_url(out_key)}, volumes)

    def _validate_train(self, spec: common_pb2.JobSpec) -> PreparedJob:
        from deep3m.models.card import check_model_id, model_exists

        t = spec.train
        check_model_id(t.model)
        store = self.roots.store()
        if model_exists(store, t.model):
            raise AlreadyExistsError(
                f"model {t.model!r} already exists in {store.url}; choose another model id",
                field="model",
            )
        if t.base_model:
            check_model_id(t.base_model)
            if not model_exists(store, t.base_model):
                raise NotFoundError(
                    f"base_model {t.base_model!r} not found in {store.url}", field="base_model"
                )
        architecture = t.architecture or "deepem3d"
        if architecture not in ARCHITECTURES:
            raise InvalidArgumentError(
                f"architecture must be one of {', '.join(ARCHITECTURES)}, got {t.architecture!r}",
                field="architecture",
            )
        members = tuple(t.members) or DEFAULT_MEMBERS[architecture]
        for m in members:
            match = _MEMBER_NAME.match(m)
            if not match or int(match[1]) % 2 == 0:
                raise InvalidArgumentError(
                    f"member {m!r} must name an odd frame count, like '1fm', '3fm' or '5fm'",
                    field="members",
                )
        if len(set(members)) != len(members):
            raise InvalidArgumentError(f"members {list(members)} repeat a name", field="members")
        _, _, images = self._volume(t.images, "images")
        _, _, labels = self._volume(t.labels, "labels")
        if labels.shape != images.shape:
            raise InvalidArgumentError(
                f"labels shape {list(labels.shape)} differs from images shape {list(images.shape)}",
                field="labels",
            )
        has_vi, has_vl = bool(t.validation_images.path), bool(t.validation_labels.path)
        if has_vi != has_vl:
            raise InvalidArgumentError(
                "give both validation_images and validation_labels, or neither",
                field="validation_labels" if has_vi else "validation_images",
            )
        if has_vi:
            _, _, vi = self._volume(t.validation_images, "validation_images")
            _, _, vl = self._volume(t.validation_labels, "validation_labels")
            if vi.shape != vl.shape:
                raise InvalidArgumentError(
                    f"validation_labels shape {list(vl.shape)} differs from validation_images "
                    f"shape {list(vi.shape)}",
                    field="validation_labels",
                )
        for name in (
            "iterations",
            "add_iterations",
            "batch_size",
            "validate_every",
            "snapshot_every",
            "accumulate_gradients",
        ):
            if getattr(t, name) < 0:
                raise InvalidArgumentError(
                    f"{name} must be >= 0, got {getattr(t, name)}", field=name
                )
        if t.width < 0 or t.learning_rate < 0:
            bad = "width" if t.width < 0 else "learning_rate"
            raise InvalidArgumentError(f"{bad} must be >= 0, got {getattr(t, bad)}", field=bad)
        if t.num_classes not in (0,) and t.num_classes < 2:
            raise InvalidArgumentError(
                f"num_classes must be >= 2, got {t.num_classes}", field="num_classes"
            )
        if t.patch_shape and (len(t.patch_shape) != 2 or min(t.patch_shape) <= 0):
            raise InvalidArgumentError(
                f"patch_shape must be 2 positive sizes (y, x), got {list(t.patch_shape)}",
                field="patch_shape",
            )
        if t.voxel_size_nm and (len(t.voxel_size_nm) != 3 or min(t.voxel_size_nm) <= 0):
            raise InvalidArgumentError(
                f"voxel_size_nm must be 3 positive sizes (z, y, x), got {list(t.voxel_size_nm)}",
                field="voxel_size_nm",
            )
        resolved = common_pb2.JobSpec()
        resolved.CopyFrom(spec)
        resolved.train.architecture = architecture
        del resolved.train.members[:]
        resolved.train.members.extend(members)
        return PreparedJob("train", resolved, {"model": f"models/{t.model}"})

    # -- outputs ------------------------------------------------------------------
    @staticmethod
    def create_outputs(prepared: PreparedJob, job_id: str) -> list[NewVolume]:
        """Create the job's new output volumes (incomplete); returns those created."""
        created: list[NewVolume] = []
        try:
            for vol in prepared.volumes:
                vol.store.create_volume(
                    vol.key,
                    vol.shape,
                    vol.dtype,
                    voxel_size_nm=vol.voxel_size_nm,
                    chunk_shape=vol.chunk_shape,
                    shard_shape=vol.shard_shape,
                    attributes={**vol.attributes, "job": job_id},
                )
                created.append(vol)
        except Exception:
            Planner.remove_outputs(created)
            raise
        return created

    @staticmethod
    def remove_outputs(volumes: Sequence[NewVolume]) -> None:
        for vol in volumes:
            vol.store.delete(vol.key)

    # -- stages -------------------------------------------------------------------
    def plan_stage(self, kind: str, resolved: common_pb2.JobSpec, index: int) -> StagePlan | None:
        """Stage ``index`` of a job, planned from the store as it is now; None past the end."""
        stages = JOB_KINDS[kind]
        if index >= len(stages):
            return None
        sdef = stages[index]
        if sdef.name == "predict":
            p = resolved.predict
            _, _, info = self._volume(p.input, "input")
            out_store, out_key = self.roots.resolve(
                p.output.store_url, p.output.path, field="output"
            )
            out = out_store.volume_info(out_key)
            grid = tuple(out.shard_shape or out.chunk_shape)
            plan = plan_blocks(info.shape, tuple(p.block_shape), tuple(p.halo), grid=grid)
            return StagePlan(
                index,
                sdef.name,
                sdef.role,
                "blocks",
                {
                    "volume_shape": list(plan.volume_shape),
                    "block_shape": list(plan.block_shape),
                    "halo": list(plan.halo),
                },
            )
        if sdef.name == "ingest":
            i = resolved.ingest
            out_store, out_key = self.roots.resolve(
                i.output.store_url, i.output.path, field="output"
            )
            out = out_store.volume_info(out_key)
            return StagePlan(
                index,
                sdef.name,
                sdef.role,
                "zranges",
                {"volume_shape": list(out.shape), "slices": int(i.slices_per_task)},
            )
        if sdef.name == "train":
            return StagePlan(
                index, sdef.name, sdef.role, "members", {"members": list(resolved.train.members)}
            )
        return StagePlan(index, sdef.name, sdef.role, "single")

    def stage_finished(
        self, kind: str, resolved: common_pb2.JobSpec, plan: StagePlan, job_id: str
    ) -> None:
        """Hooks after a stage: a volume every block of which is written becomes complete."""
        if plan.name in ("predict", "ingest"):
            ref = resolved.predict.output if plan.name == "predict" else resolved.ingest.output
            store, key = self.roots.resolve(ref.store_url, ref.path, field="output")
            store.mark_complete(key, job=job_id)
