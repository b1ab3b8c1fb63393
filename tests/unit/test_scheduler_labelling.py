"""The label kind and predict's sharded postprocess stages: validation and plans, no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deep3m.core.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from deep3m.core.geometry import Box, plan_blocks
from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store
from deep3m.runtime.settings import Settings
from deep3m.scheduler import kinds
from deep3m.scheduler.kinds import KINDS, KindContext
from deep3m.scheduler.kinds.base import VolumeFacts
from deep3m.scheduler.kinds.labelling import (
    LABELLING_STAGES,
    labelling_stages,
    plan_labelling,
    table_shards,
)
from deep3m.scheduler.kinds.refs import create_outputs
from deep3m.scheduler.stages import StagePlan
from deep3m.testing.scheduler import save_test_model, write_volume
from deep3m.v1 import common_pb2

SHAPE = (8, 64, 96)
NAMES = [s.name for s in LABELLING_STAGES]  # volumes too small for pyramid levels


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"file://{tmp_path}/store")
    write_volume(s, "volumes/prob.zarr", np.zeros(SHAPE, np.float32), chunk_shape=(4, 32, 32))
    write_volume(s, "volumes/in.zarr", np.zeros(SHAPE, np.uint8), chunk_shape=(4, 32, 32))
    save_test_model(s, "m1", {"1fm": 1}, halo=(0, 8, 8))
    return s


@pytest.fixture
def ctx(store: Store) -> KindContext:
    return KindContext(StoreRoots.from_settings(Settings(store_url=store.url)))


def label(**fields: object) -> common_pb2.JobSpec:
    spec = common_pb2.LabelSpec(input=common_pb2.VolumeRef(path="volumes/prob.zarr"))
    for name, value in fields.items():
        field = getattr(spec, name)
        if isinstance(value, list):
            field.extend(value)
        elif isinstance(value, common_pb2.VolumeRef):
            field.CopyFrom(value)
        else:
            setattr(spec, name, value)
    return common_pb2.JobSpec(label=spec)


def plans(kind: str, resolved: kinds.Resolved) -> list[StagePlan]:
    out = []
    for index in range(20):
        plan = KINDS[kind].plan(index, resolved)
        if plan is None:
            break
        out.append(plan)
    return out


def test_label_defaults_volume_and_plans(ctx: KindContext, store: Store) -> None:
    prepared = kinds.validate(label(), ctx)
    r = prepared.resolved.spec.label
    assert (r.threshold, r.connectivity, r.name) == (0.5, 1, "segmentation")
    assert r.output.path == "volumes/prob.zarr/labels/segmentation"
    assert list(r.block_shape) == [8, 64, 96]  # the default block, clipped to the volume
    assert r.table_shards == table_shards(1) == 4
    (vol,) = prepared.volumes
    assert (vol.key, vol.dtype, vol.shape) == (r.output.path, "uint32", SHAPE)
    assert vol.chunk_shape == (4, 32, 32) and vol.attributes["kind"] == "labels"
    assert prepared.outputs == {"labels": store.key_url(r.output.path)}
    assert not store.exists(f"{r.output.path}/zarr.json")  # created by the scheduler, not here

    prepared = kinds.validate(label(block_shape=[4, 32, 32], table_shards=3), ctx)
    got = plans("label", prepared.resolved)
    assert [p.name for p in got] == NAMES
    assert all(p.role == "postprocess" for p in got)
    expected = plan_blocks(SHAPE, (4, 32, 32), (0, 0, 0), grid=(4, 32, 32))
    for p in got:
        if p.name in ("summarize", "equivalences", "relabel"):
            assert p.n_tasks == len(expected) == 2 * 2 * 3
            assert p.task(5).block == expected.block(5)
            assert p.task(5).id == f"{p.name}/{expected.block(5).id}"
    # The table's parts are reduced by relabel tasks: no stage of their own.
    assert [p.name for p in got if p.layout == "single"] == ["merge", "reduce"]
    assert all(p.n_tasks == 1 for p in got if p.layout == "single")
    assert StagePlan.from_json(got[-1].to_json()).name == "reduce"


def test_pyramid_levels_are_planned_as_chunk_aligned_block_stages() -> None:
    facts = VolumeFacts("file:///s", "l.zarr", "", (20, 2048, 1100), "uint32", (4, 256, 256),
                        (40.0, 6.0, 6.0))  # fmt: skip
    spec = common_pb2.LabelSpec(block_shape=[4, 512, 512], table_shards=2)
    names = [s.name for s in labelling_stages(facts, spec)]
    # 256² level-1 regions, the 512² blocks halved: relabel writes level 1 itself.
    assert names[-3:] == ["pyramid_2", "pyramid_3", "reduce"]
    got = [plan_labelling(i, 0, facts, spec) for i in range(len(names) + 1)]
    assert got[-1] is None
    level2, level3 = (got[names.index(f"pyramid_{n}")] for n in (2, 3))
    # Blocks of 256² would make level-1 regions of one 256² chunk, 4 blocks each:
    # a stage of its own.
    small = common_pb2.LabelSpec(block_shape=[4, 256, 256], table_shards=2)
    names = [s.name for s in labelling_stages(facts, small)]
    assert names[-4:] == ["pyramid_1", "pyramid_2", "pyramid_3", "reduce"]
    level1 = plan_labelling(names.index("pyramid_1"), 0, facts, small)
    assert level1 is not None and level2 is not None and level3 is not None
    # Each task reads about one block of level 0: level 1 (20 x 1024 x 550) in regions
    # of 4 x 256², level 2 (20 x 512 x 275) of one chunk, level 3 (20 x 256 x 138) in
    # one chunk per z-range (x narrower than a chunk).
    assert level1.layout == "blocks" and level1.n_tasks == 5 * 4 * 3
    assert level1.task(11).block.core == Box((0, 768, 512), (4, 1024, 550))  # type: ignore[union-attr]
    assert level1.params["block_shape"] == [4, 256, 256]
    assert level2.params["block_shape"] == [4, 256, 256] and level2.n_tasks == 5 * 2 * 2
    assert level3.params["block_shape"] == [4, 256, 138] and level3.n_tasks == 5


@pytest.mark.parametrize(
    ("fields", "error", "field"),
    [
        ({"threshold": 1.5}, InvalidArgumentError, "threshold"),
        ({"connectivity": 4}, InvalidArgumentError, "connectivity"),
        ({"min_size_voxels": -1}, InvalidArgumentError, "min_size_voxels"),
        ({"name": "a/b"}, InvalidArgumentError, "name"),
        ({"block_shape": [4, 30, 32]}, InvalidArgumentError, "block_shape"),
        ({"block_shape": [4, 32]}, InvalidArgumentError, "block_shape"),
        ({"table_shards": 5000}, InvalidArgumentError, "table_shards"),
        (
            {"input": common_pb2.VolumeRef(path="volumes/none.zarr")},
            NotFoundError,
            "input",
        ),
        (
            {"output": common_pb2.VolumeRef(path="volumes/in.zarr")},
            AlreadyExistsError,
            "output",
        ),
        (
            {"output": common_pb2.VolumeRef(path="volumes/prob.zarr")},
            InvalidArgumentError,
            "output",
        ),
    ],
)
def test_label_validation_names_the_field(
    ctx: KindContext, fields: dict[str, object], error: type[Exception], field: str
) -> None:
    with pytest.raises(error) as info:
        kinds.validate(label(**fields), ctx)
    assert getattr(info.value, "field", None) == field


def test_an_earlier_labels_volume_is_reused_not_recreated(ctx: KindContext, store: Store) -> None:
    first = kinds.validate(label(), ctx)
    create_outputs(first.volumes, "job-1")
    again = kinds.validate(label(), ctx)
    assert again.volumes == ()
    assert again.resolved.volumes["labels"] == first.resolved.volumes["labels"]


def predict(postprocess: bool, **labelling: object) -> common_pb2.JobSpec:
    return common_pb2.JobSpec(
        predict=common_pb2.PredictSpec(
            input=common_pb2.VolumeRef(path="volumes/in.zarr"),
            model="m1",
            output=common_pb2.VolumeRef(path="volumes/out.zarr"),
            block_shape=[4, 32, 32],
            postprocess=postprocess,
            threshold=0.7,
            labelling=common_pb2.LabelSpec(**labelling),  # type: ignore[arg-type]
        )
    )


def test_predict_with_postprocess_runs_the_sharded_stages(ctx: KindContext, store: Store) -> None:
    prepared = kinds.validate(predict(True, connectivity=3), ctx)
    resolved = prepared.resolved
    lab = resolved.spec.predict.labelling
    assert (lab.threshold, lab.connectivity) == (pytest.approx(0.7), 3)
    assert list(lab.block_shape) == [4, 32, 32]  # the prediction blocks
    assert lab.input.path == "volumes/out.zarr"
    labels_key = "volumes/out.zarr/labels/segmentation"
    assert [v.key for v in prepared.volumes] == ["volumes/out.zarr", labels_key]
    assert prepared.outputs["labels"] == store.key_url(labels_key)
    stages = KINDS["predict"].stages_for(resolved)
    assert [s.name for s in stages] == ["predict", *NAMES]
    got = plans("predict", resolved)
    assert [p.name for p in got] == ["predict", *NAMES]
    assert got[1].n_tasks == got[0].n_tasks == 2 * 2 * 3
    assert got[1].task(3).block is not None
    assert got[1].task(3).block.core == got[0].task(3).block.core  # type: ignore[union-attr]

    create_outputs(prepared.volumes, "job-1")
    assert store.volume_info(labels_key).attributes["kind"] == "labels"


def test_predict_without_postprocess_keeps_its_finalize(ctx: KindContext) -> None:
    resolved = kinds.validate(predict(False), ctx).resolved
    assert [p.name for p in plans("predict", resolved)] == ["predict", "finalize"]
    assert "labels" not in resolved.volumes


def test_predict_labelling_is_checked_under_its_field(ctx: KindContext) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        kinds.validate(predict(True, connectivity=7), ctx)
    assert info.value.field == "labelling.connectivity"
