"""Job kinds: submit-time validation, defaults, resolved volumes and stage plans (no network)."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pytest
from deep3m.core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from deep3m.core.geometry import plan_blocks
from deep3m.core.grey_levels import GreyLevels
from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store
from deep3m.models.recipes import recipe_defaults
from deep3m.runtime.settings import Settings
from deep3m.scheduler import kinds
from deep3m.scheduler.kinds import KINDS, KindContext, VolumeFacts, check_job_id, job_kind
from deep3m.scheduler.kinds.predict import chunk_for_block
from deep3m.scheduler.kinds.refs import create_outputs
from deep3m.scheduler.stages import StagePlan
from deep3m.testing.scheduler import save_test_model, write_volume
from deep3m.v1 import common_pb2

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
SHAPE = (10, 100, 120)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"file://{tmp_path}/store")
    write_volume(s, "volumes/in.zarr", np.zeros(SHAPE, np.uint8))
    save_test_model(s, "m1", {"1fm": 1, "5fm": 5}, halo=(2, 8, 8))
    return s


@pytest.fixture
def ctx(store: Store) -> KindContext:
    # Sources come from the tests' temporary folders and the shared data.
    roots = f"file://{tempfile.gettempdir()},file://{DATA.resolve()}"
    return KindContext(StoreRoots.from_settings(Settings(store_url=store.url, input_roots=roots)))


def predict(**fields: object) -> common_pb2.JobSpec:
    spec = common_pb2.PredictSpec(
        input=common_pb2.VolumeRef(path="volumes/in.zarr"),
        model="m1",
        output=common_pb2.VolumeRef(path="volumes/out.zarr"),
    )
    for name, value in fields.items():
        field = getattr(spec, name)
        if isinstance(value, list | tuple):
            field.extend(value)
        elif isinstance(value, common_pb2.VolumeRef):
            field.CopyFrom(value)
        else:
            setattr(spec, name, value)
    return common_pb2.JobSpec(predict=spec)


def test_predict_defaults_are_resolved_without_writing(ctx: KindContext, store: Store) -> None:
    prepared = kinds.validate(predict(), ctx)
    r = prepared.resolved.spec.predict
    assert list(r.block_shape) == [8, 100, 120]  # default (8, 1024, 1024) clipped to the volume
    assert list(r.halo) == [2, 8, 8]  # from the model card
    assert list(r.members) == ["1fm", "5fm"]
    assert r.tta_level == 10
    assert prepared.outputs == {"probabilities": store.key_url("volumes/out.zarr")}
    (vol,) = prepared.volumes
    assert vol.shape == SHAPE and vol.dtype == "float32" and vol.voxel_size_nm == (40, 6, 6)
    assert not store.exists("volumes/out.zarr")


def test_predict_plan_matches_the_block_grid(ctx: KindContext, store: Store) -> None:
    prepared = kinds.validate(predict(block_shape=[4, 64, 64], halo=[2, 4, 4]), ctx)
    create_outputs(prepared.volumes, "job-1")
    info = store.volume_info("volumes/out.zarr")
    assert info.chunk_shape == (4, 64, 64) and not info.complete
    assert info.attributes["job"] == "job-1"
    plan = KINDS["predict"].plan(0, prepared.resolved)
    assert plan is not None and plan.layout == "blocks"
    expected = plan_blocks(SHAPE, (4, 64, 64), (2, 4, 4), grid=(4, 64, 64))
    assert plan.n_tasks == len(expected) == 3 * 2 * 2
    for n in range(plan.n_tasks):
        task = plan.task(n)
        assert task.block == expected.block(n)
        assert task.id == f"predict/{expected.block(n).id}"
    last = plan.task(11)
    assert last.id == "predict/b2-1-1"
    assert last.block is not None and last.block.core.stop == SHAPE
    finalize = KINDS["predict"].plan(1, prepared.resolved)
    assert finalize is not None and (finalize.role, finalize.n_tasks) == ("postprocess", 1)
    assert KINDS["predict"].plan(2, prepared.resolved) is None
    KINDS["predict"].on_stage_finished(plan, prepared.resolved, ctx, "job-1")
    assert store.volume_info("volumes/out.zarr").complete


def test_an_identical_existing_output_is_reused_when_resuming(
    ctx: KindContext, store: Store
) -> None:
    first = kinds.validate(predict(block_shape=[4, 64, 64]), ctx)
    create_outputs(first.volumes, "job-1")
    ctx = dataclasses.replace(ctx, resume=True)
    again = kinds.validate(predict(), ctx)
    assert again.volumes == ()  # resume: nothing to create
    # Default (8, 1024, 1024) on the existing 64-voxel grid, no bigger than the volume needs.
    assert list(again.resolved.spec.predict.block_shape) == [8, 128, 128]
    with pytest.raises(InvalidArgumentError, match="not a multiple") as err:
        kinds.validate(predict(block_shape=[4, 48, 64]), ctx)
    assert err.value.field == "block_shape"


def test_a_complete_output_is_replaced_only_with_overwrite(ctx: KindContext, store: Store) -> None:
    first = kinds.validate(predict(block_shape=[4, 64, 64]), ctx)
    create_outputs(first.volumes, "job-1")
    store.write_json("volumes/out.zarr/labels/zarr.json", {"stale": True})
    # An incomplete output is a failed job's debris: a retry replaces it.
    retry = kinds.validate(predict(), ctx)
    assert [v.replace for v in retry.volumes] == [True]
    store.mark_complete("volumes/out.zarr")
    with pytest.raises(AlreadyExistsError, match=r"complete volume \(job 'job-1', model") as err:
        kinds.validate(predict(), ctx)
    assert err.value.field == "output" and "--overwrite" in err.value.message
    replaced = kinds.validate(predict(overwrite=True), ctx)
    create_outputs(replaced.volumes, "job-2")
    info = store.volume_info("volumes/out.zarr")
    assert not info.complete and info.attributes["job"] == "job-2"
    assert not store.exists("volumes/out.zarr/labels/zarr.json")  # stale labels went too


def test_an_output_holding_a_different_array_is_refused(ctx: KindContext, store: Store) -> None:
    write_volume(store, "volumes/other.zarr", np.zeros((10, 100, 120), np.uint8))
    with pytest.raises(
        AlreadyExistsError, match=r"volumes/other\.zarr already holds a complete volume"
    ) as err:
        kinds.validate(predict(output=common_pb2.VolumeRef(path="volumes/other.zarr")), ctx)
    assert err.value.field == "output"
    store.write_json("volumes/notes/readme.json", {"x": 1})
    with pytest.raises(AlreadyExistsError, match="not a volume"):
        kinds.validate(predict(output=common_pb2.VolumeRef(path="volumes/notes")), ctx)


@pytest.mark.parametrize(
    ("fields", "error", "field", "match"),
    [
        ({"model": "nope"}, NotFoundError, "model", "model 'nope' not found"),
        ({"model": "../x"}, InvalidArgumentError, "model", "model id"),
        (
            {"input": common_pb2.VolumeRef(path="volumes/missing.zarr")},
            NotFoundError,
            "input",
            "missing.zarr",
        ),
        ({"input": common_pb2.VolumeRef(path="")}, InvalidArgumentError, "input.path", "empty"),
        (
            {"output": common_pb2.VolumeRef(path="../escape.zarr")},
            InvalidArgumentError,
            "output.path",
            "leaves the store root",
        ),
        (
            {"output": common_pb2.VolumeRef(path="volumes/in.zarr")},
            InvalidArgumentError,
            "output",
            "is the input",
        ),
        (
            {"output": common_pb2.VolumeRef(path="volumes/out.zarr", array="1")},
            InvalidArgumentError,
            "output.array",
            "full-resolution",
        ),
        (
            {"input": common_pb2.VolumeRef(store_url="file:///elsewhere", path="v.zarr")},
            InvalidArgumentError,
            "input.store_url",
            "outside the configured store roots",
        ),
        ({"halo": [1, 8, 8]}, InvalidArgumentError, "halo", "5-frame members need 2"),
        ({"halo": [2, -1, 8]}, InvalidArgumentError, "halo", ">= 0"),
        ({"halo": [2, 8]}, InvalidArgumentError, "halo", "3 values"),
        ({"members": ["7fm"]}, InvalidArgumentError, "members", "no member '7fm'"),
        ({"members": ["1fm", "1fm"]}, InvalidArgumentError, "members", "repeat"),
        ({"tta_level": 3}, InvalidArgumentError, "tta_level", "one of"),
        ({"block_shape": [0, 64, 64]}, InvalidArgumentError, "block_shape", ">= 1"),
        ({"postprocess": True, "threshold": 1.5}, InvalidArgumentError, "threshold", "(0, 1)"),
    ],
)
def test_predict_validation_names_the_field(
    ctx: KindContext,
    store: Store,
    fields: dict[str, object],
    error: type[Exception],
    field: str,
    match: str,
) -> None:
    with pytest.raises(error, match=match) as err:
        kinds.validate(predict(**fields), ctx)
    assert getattr(err.value, "field", None) == field
    assert not store.exists("volumes/out.zarr")


def test_halo_is_checked_against_the_chosen_members(ctx: KindContext) -> None:
    # Only the 1-frame member: no z context needed.
    prepared = kinds.validate(predict(members=["1fm"], halo=[0, 8, 8]), ctx)
    assert list(prepared.resolved.spec.predict.halo) == [0, 8, 8]


def test_incomplete_input_is_refused(ctx: KindContext, store: Store) -> None:
    write_volume(store, "volumes/partial.zarr", np.zeros((4, 32, 32), np.uint8), complete=False)
    with pytest.raises(FailedPreconditionError, match="incomplete") as err:
        kinds.validate(predict(input=common_pb2.VolumeRef(path="volumes/partial.zarr")), ctx)
    assert err.value.field == "input"


def test_blocks_too_large_for_a_worker_are_refused(store: Store) -> None:
    small = KindContext(
        StoreRoots.from_settings(Settings(store_url=store.url)), max_region_voxels=10_000
    )
    with pytest.raises(InvalidArgumentError, match="more than the limit") as err:
        kinds.validate(predict(), small)
    assert err.value.field == "block_shape"


def test_ingest_from_a_zarr_source(ctx: KindContext, store: Store, tmp_path: Path) -> None:
    source = str(tmp_path / "store" / "volumes" / "in.zarr")
    spec = common_pb2.JobSpec(
        ingest=common_pb2.IngestSpec(
            source=source,
            output=common_pb2.VolumeRef(path="volumes/ing.zarr"),
            chunk_shape=[4, 64, 64],
        )
    )
    prepared = kinds.validate(spec, ctx)
    assert prepared.resolved.spec.ingest.slices_per_task == 4
    assert list(prepared.resolved.spec.ingest.voxel_size_nm) == [40.0, 6.0, 6.0]
    create_outputs(prepared.volumes, "ing")
    plan = KINDS["ingest"].plan(0, prepared.resolved)
    assert plan is not None and (plan.role, plan.layout, plan.n_tasks) == ("tiling", "zranges", 3)
    last = plan.task(2)
    assert last.id == "ingest/b2-0-0" and dict(last.params) == {"z_start": "8", "z_stop": "10"}
    assert last.block is not None and last.block.core.stop == SHAPE
    bad = common_pb2.JobSpec()
    bad.CopyFrom(spec)
    bad.ingest.output.path = "volumes/ing2.zarr"
    bad.ingest.slices_per_task = 6
    with pytest.raises(InvalidArgumentError, match="multiple of the output's z grid") as err:
        kinds.validate(bad, ctx)
    assert err.value.field == "slices_per_task"
    bad.ingest.slices_per_task = 0
    bad.ingest.source = str(tmp_path / "nothing-here")
    with pytest.raises(NotFoundError, match="nothing-here"):
        kinds.validate(bad, ctx)
    assert not store.exists("volumes/ing2.zarr")


@pytest.mark.skipif(not (DATA / "isbi2012").is_dir(), reason="needs ../shared/data/isbi2012")
def test_ingest_plans_the_real_isbi_stack(ctx: KindContext) -> None:
    spec = common_pb2.JobSpec(
        ingest=common_pb2.IngestSpec(
            source=str(DATA / "isbi2012" / "train" / "images"),
            output=common_pb2.VolumeRef(path="volumes/isbi.zarr"),
            voxel_size_nm=[50, 4, 4],
        )
    )
    prepared = kinds.validate(spec, ctx)
    (vol,) = prepared.volumes
    assert vol.shape == (30, 512, 512) and vol.dtype == "uint8"
    assert vol.chunk_shape == (8, 256, 256)
    create_outputs(prepared.volumes, "isbi")
    plan = KINDS["ingest"].plan(0, prepared.resolved)
    assert plan is not None and plan.n_tasks == 4  # 30 slices in z-ranges of 8


def train(**fields: object) -> common_pb2.JobSpec:
    spec = common_pb2.TrainSpec(
        images=common_pb2.VolumeRef(path="volumes/in.zarr"),
        labels=common_pb2.VolumeRef(path="volumes/labels.zarr"),
        model="new-model",
    )
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(spec, name).extend(value)
        else:
            setattr(spec, name, value)
    return common_pb2.JobSpec(train=spec)


def test_train_validation_and_member_tasks(ctx: KindContext, store: Store) -> None:
    write_volume(store, "volumes/labels.zarr", np.zeros(SHAPE, np.uint8))
    prepared = kinds.validate(train(), ctx)
    # Unset fields come from the default recipe, so the check sees what will run.
    default = recipe_defaults("")
    assert list(prepared.resolved.spec.train.members) == list(default["members"])
    assert prepared.resolved.spec.train.architecture == default["architecture"]
    cdeep3m = kinds.validate(train(recipe="cdeep3m"), ctx).resolved.spec.train
    assert (cdeep3m.architecture, list(cdeep3m.members)) == ("deepem3d", ["1fm", "3fm", "5fm"])
    only_arch = kinds.validate(train(architecture="resunet3d"), ctx).resolved.spec.train
    assert list(only_arch.members) == ["1fm"]  # another architecture: its own members
    plan = KINDS["train"].plan(0, prepared.resolved)
    assert plan is not None and plan.role == "training"
    assert [plan.task(n).id for n in range(plan.n_tasks)] == ["train/1fm", "train/3fm", "train/5fm"]
    assert dict(plan.task(1).params) == {"member": "3fm"}
    cases: list[tuple[dict[str, object], type[Exception], str]] = [
        ({"model": "m1"}, AlreadyExistsError, "model"),
        ({"members": ["2fm"]}, InvalidArgumentError, "members"),
        ({"architecture": "vgg"}, InvalidArgumentError, "architecture"),
        ({"base_model": "ghost"}, NotFoundError, "base_model"),
        ({"iterations": -1}, InvalidArgumentError, "iterations"),
    ]
    for fields, error, field in cases:
        with pytest.raises(error) as err:
            kinds.validate(train(**fields), ctx)
        assert getattr(err.value, "field", None) == field, fields
    write_volume(store, "volumes/small-labels.zarr", np.zeros((4, 32, 32), np.uint8))
    spec = train()
    spec.train.labels.path = "volumes/small-labels.zarr"
    with pytest.raises(InvalidArgumentError, match="differs") as err:
        kinds.validate(spec, ctx)
    assert err.value.field == "labels"


def test_an_adaptation_target_recorded_as_all_zero_is_refused_at_submission(
    ctx: KindContext, store: Store
) -> None:
    write_volume(store, "volumes/labels.zarr", np.zeros(SHAPE, np.uint8))
    target = np.zeros(SHAPE, np.uint8)

    def submit(path: str) -> common_pb2.JobSpec:
        spec = train(adaptation="histogram", architecture="resunet2d", members=["1fm"])
        spec.train.adapt_to.path = path
        return spec

    # Written without grey levels (an older writer): the training worker checks it.
    write_volume(store, "volumes/unrecorded.zarr", target)
    assert "adapt_to" in kinds.validate(submit("volumes/unrecorded.zarr"), ctx).resolved.volumes
    write_volume(store, "volumes/zeros.zarr", target, complete=False)
    store.mark_complete("volumes/zeros.zarr", **GreyLevels.of(target).attributes())
    with pytest.raises(InvalidArgumentError, match=r"volumes/zeros\.zarr holds only zeros") as err:
        kinds.validate(submit("volumes/zeros.zarr"), ctx)
    assert err.value.field == "adapt_to"
    target[0, 0, 0] = 1
    write_volume(store, "volumes/one.zarr", target, complete=False)
    store.mark_complete("volumes/one.zarr", **GreyLevels.of(target).attributes())
    assert "adapt_to" in kinds.validate(submit("volumes/one.zarr"), ctx).resolved.volumes
    store.mark_complete("volumes/one.zarr", grey_levels={"voxels": "many"})
    with pytest.raises(InvalidArgumentError, match=r"volumes/one\.zarr: .*malformed") as err:
        kinds.validate(submit("volumes/one.zarr"), ctx)
    assert err.value.field == "adapt_to"


def test_stage_plans_round_trip_and_check_numbers() -> None:
    plan = StagePlan(
        0,
        "predict",
        "inference",
        "blocks",
        {"volume_shape": [10, 100, 120], "block_shape": [4, 64, 64], "halo": [2, 4, 4]},
    )
    again = StagePlan.from_json(plan.to_json())
    assert again == plan and again.n_tasks == 12
    with pytest.raises(InvalidArgumentError, match="outside"):
        plan.task(12)
    with pytest.raises(InvalidArgumentError, match="layout"):
        StagePlan(0, "x", "tiling", "spiral")


def test_ids_kinds_and_chunks() -> None:
    assert check_job_id("predict-2026_01.a") == "predict-2026_01.a"
    for bad in ("", "-x", "a/b", "x" * 65, "a:b"):
        with pytest.raises(InvalidArgumentError):
            check_job_id(bad)
    with pytest.raises(InvalidArgumentError, match="names no kind") as err:
        job_kind(common_pb2.JobSpec())
    assert err.value.field == "spec"
    assert chunk_for_block((8, 512, 512)) == (8, 256, 256)
    assert chunk_for_block((10, 300, 256)) == (10, 300, 256)


# -- resolved volumes ----------------------------------------------------------------
def test_volumes_are_resolved_once_and_carried_to_the_lease(ctx: KindContext, store: Store) -> None:
    from deep3m.scheduler.convert import grant_to_proto
    from deep3m.scheduler.jobs import Grant

    prepared = kinds.validate(predict(block_shape=[4, 64, 64], halo=[2, 4, 4]), ctx)
    volumes = prepared.resolved.volumes
    assert volumes["input"] == VolumeFacts(
        store.url, "volumes/in.zarr", "", SHAPE, "uint8", (4, 32, 32), (40.0, 6.0, 6.0)
    )
    assert volumes["output"].grid == (4, 64, 64) and volumes["output"].dtype == "float32"
    # Planning needs nothing but the resolved job: no store is read.
    plan = KINDS["predict"].plan(0, kinds.Resolved(prepared.resolved.spec, volumes))
    assert plan is not None and plan.n_tasks == 12
    lease = grant_to_proto(
        Grant(
            "l", 1.0, "j", "predict", "inference", 1, plan.task(0), prepared.resolved.spec, volumes
        )
    )
    out = lease.volumes["output"]
    assert (list(out.shape), out.dtype, list(out.grid)) == ([10, 100, 120], "float32", [4, 64, 64])
    assert lease.volumes["input"].path == "volumes/in.zarr"
    assert VolumeFacts.from_json(volumes["input"].to_json()) == volumes["input"]


def test_a_job_record_without_resolved_volumes_names_what_is_missing() -> None:
    with pytest.raises(InvalidArgumentError, match="resubmit") as err:
        kinds.Resolved(common_pb2.JobSpec()).volume("output")
    assert err.value.field == "output"


# -- training jobs: what the stack and the numbers allow -----------------------------
@pytest.fixture
def stack4(store: Store) -> Store:
    """A 4-slice, 40 × 40 labelled stack."""
    write_volume(store, "volumes/s4.zarr", np.zeros((4, 40, 40), np.uint8))
    write_volume(store, "volumes/s4-labels.zarr", np.ones((4, 40, 40), np.uint8))
    return store


def small_train(**fields: object) -> common_pb2.JobSpec:
    spec = train(**fields)
    spec.train.images.path = "volumes/s4.zarr"
    spec.train.labels.path = "volumes/s4-labels.zarr"
    return spec


def test_members_the_stack_cannot_feed_are_refused_with_a_suggestion(
    ctx: KindContext, stack4: Store
) -> None:
    with pytest.raises(InvalidArgumentError, match=r"4 slice.*5fm.*--members 1fm,3fm") as err:
        kinds.validate(small_train(), ctx)
    assert err.value.field == "members"
    prepared = kinds.validate(small_train(members=["1fm", "3fm"]), ctx)
    assert list(prepared.resolved.spec.train.members) == ["1fm", "3fm"]
    # The validation stack must feed every member too.
    write_volume(stack4, "volumes/v2.zarr", np.zeros((2, 40, 40), np.uint8))
    spec = small_train(members=["1fm", "3fm"])
    spec.train.validation_images.path = "volumes/v2.zarr"
    spec.train.validation_labels.path = "volumes/v2.zarr"
    with pytest.raises(InvalidArgumentError, match=r"validation_images.*--members 1fm") as err:
        kinds.validate(spec, ctx)
    assert err.value.field == "members"


def test_a_patch_larger_than_the_image_is_clipped_with_a_note(
    ctx: KindContext, stack4: Store
) -> None:
    prepared = kinds.validate(small_train(members=["1fm"], patch_shape=[320, 32]), ctx)
    assert list(prepared.resolved.spec.train.patch_shape) == [32, 32]  # 40 → 32 (stride 16)
    (note,) = prepared.notes
    assert "clipped to the image" in note and "[32, 32]" in note
    fits = kinds.validate(small_train(members=["1fm"], patch_shape=[32, 32]), ctx)
    assert fits.notes == ()
    assert list(fits.resolved.spec.train.patch_shape) == [32, 32]
    # An unset patch is the recipe's, clipped the same way.
    unset = kinds.validate(small_train(members=["1fm"]), ctx)
    assert list(unset.resolved.spec.train.patch_shape) == [32, 32]
    (note,) = unset.notes
    assert "clipped to the image" in note


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"learning_rate": float("inf")}, "learning_rate"),
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"learning_rate": 1e6}, "learning_rate"),
        ({"width": float("nan")}, "width"),
        ({"width": 100.0}, "width"),
        ({"iterations": 2 * 10**9}, "iterations"),
        ({"iterations": -1}, "iterations"),
        ({"add_iterations": 10**12}, "add_iterations"),
        ({"batch_size": 100_000}, "batch_size"),
        ({"accumulate_gradients": -2}, "accumulate_gradients"),
        ({"validate_every": 10**10}, "validate_every"),
        ({"snapshot_every": -5}, "snapshot_every"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 1000}, "num_classes"),
        ({"voxel_size_nm": [40.0, float("nan"), 6.0]}, "voxel_size_nm"),
        ({"voxel_size_nm": [40.0, 6.0]}, "voxel_size_nm"),
        ({"patch_shape": [100, 96]}, "patch_shape"),
        ({"patch_shape": [0, 96]}, "patch_shape"),
        ({"recipe": "fastest"}, "recipe"),
        ({"loss": "hinge"}, "loss"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"schedule": "step"}, "schedule"),
        ({"max_minutes": float("nan")}, "max_minutes"),
        ({"max_minutes": -1.0}, "max_minutes"),
        ({"snapshot_every_minutes": float("nan")}, "snapshot_every_minutes"),
        ({"snapshot_every_minutes": float("inf")}, "snapshot_every_minutes"),
        ({"snapshot_every_minutes": -1.0}, "snapshot_every_minutes"),
        ({"snapshot_every_minutes": 1e5}, "snapshot_every_minutes"),
        ({"input_scale": 9}, "input_scale"),
        ({"foreground_fraction": 1.5}, "foreground_fraction"),
        ({"foreground_fraction": float("nan")}, "foreground_fraction"),
    ],
)
def test_absurd_training_numbers_are_refused_naming_the_field(
    ctx: KindContext, store: Store, fields: dict[str, object], field: str
) -> None:
    write_volume(store, "volumes/labels.zarr", np.zeros(SHAPE, np.uint8))
    with pytest.raises(InvalidArgumentError) as err:
        kinds.validate(train(**fields), ctx)
    assert err.value.field == field
    assert field in err.value.message


def test_the_scheduler_copies_of_network_facts_match_the_models() -> None:
    from deep3m.models import registry
    from deep3m.scheduler.kinds import train as train_kind

    assert train_kind.PATCH_MULTIPLE == registry.INPUT_MULTIPLE
    assert set(train_kind.ARCHITECTURES) == set(registry.ARCHITECTURES)
    for name in ("1fm", "3fm", "5fm", "7fm"):
        assert train_kind.member_frames(name) == registry.member_frames(name)
    from typing import get_args

    from deep3m.models.scaled import MAX_INPUT_SCALE
    from deep3m.training import config, objectives

    assert train_kind.MAX_INPUT_SCALE == MAX_INPUT_SCALE
    assert train_kind.LIMITS["snapshot_every_minutes"] == config.MAX_SNAPSHOT_MINUTES
    assert train_kind.CHOICES["loss"] == get_args(objectives.Loss)
    assert train_kind.CHOICES["schedule"] == get_args(objectives.Schedule)
    assert train_kind.CHOICES["optimizer"] == get_args(
        config.TrainConfig.model_fields["optimizer"].annotation
    )


@pytest.mark.parametrize(
    "layout, params",
    [
        ("blocks", {"volume_shape": [5, 70, 33], "block_shape": [2, 32, 16], "halo": [0, 4, 4]}),
        ("zranges", {"volume_shape": [10, 8, 8], "slices": 4}),
        ("members", {"members": ["1fm", "3fm"]}),
        ("single", {}),
    ],
)
def test_a_task_id_is_that_of_the_task(layout: str, params: dict[str, object]) -> None:
    plan = StagePlan(0, "s", "inference", layout, params)
    assert [plan.task_id(n) for n in range(plan.n_tasks)] == [
        plan.task(n).id for n in range(plan.n_tasks)
    ]
    with pytest.raises(InvalidArgumentError, match="task number"):
        plan.task_id(plan.n_tasks)
