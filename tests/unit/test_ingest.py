"""Ingest into OME-Zarr (deep3m.core.ingest): layout, atomicity, task pieces."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from deep3m.core.errors import (
    AlreadyExistsError,
    CancelledError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from deep3m.core.events import ProgressEvent
from deep3m.core.imageio import open_source
from deep3m.core.ingest import (
    create_ingest_volume,
    finalize_ingest,
    ingest,
    ingest_range,
    plan_ingest,
)
from deep3m.core.store import Store
from PIL import Image

RNG = np.random.default_rng(11)
VOXEL = (40.0, 6.0, 6.0)


@pytest.fixture
def store() -> Iterator[Store]:
    s = Store(f"memory://ingest-{uuid.uuid4().hex[:10]}")
    yield s
    s.delete("volumes")


def png_stack(folder: Path, z: int = 10, y: int = 40, x: int = 36) -> np.ndarray:
    data = RNG.integers(0, 256, size=(z, y, x), dtype=np.uint8)
    folder.mkdir(parents=True)
    for i, page in enumerate(data):
        Image.fromarray(page).save(folder / f"p{i}.png")
    return data


def test_ingest_writes_every_pixel_and_marks_complete(tmp_path: Path, store: Store) -> None:
    data = png_stack(tmp_path / "pages")
    events: list[ProgressEvent] = []
    result = ingest(
        str(tmp_path / "pages"),
        store,
        "volumes/v.zarr",
        voxel_size_nm=VOXEL,
        chunk_shape=(4, 16, 16),
        workers=3,
        observer=events.append,
        job_id="j1",
    )
    assert result.shape == data.shape and result.dtype == "uint8"
    assert result.tasks == 3  # z-ranges [0,4) [4,8) [8,10)
    assert result.bytes_written == data.nbytes
    info = store.volume_info("volumes/v.zarr")
    assert info.complete and info.chunk_shape == (4, 16, 16) and info.voxel_size_nm == VOXEL
    np.testing.assert_array_equal(store.open_volume("volumes/v.zarr")[:], data)
    assert all(e.job_id == "j1" and e.stage == "ingest" for e in events)
    assert events[-1].state == "SUCCEEDED" and events[-1].tasks_done == 3
    done = [e.tasks_done for e in events if e.state == "RUNNING"]
    assert done == sorted(done) and done[-1] == 3


def test_plan_aligns_ranges_to_chunks_and_shards(tmp_path: Path) -> None:
    png_stack(tmp_path / "p", z=21)
    plan = plan_ingest(
        str(tmp_path / "p"), voxel_size_nm=VOXEL, chunk_shape=(4, 16, 16), slices_per_task=8
    )
    assert plan.z_ranges == ((0, 8), (8, 16), (16, 21))
    plan = plan_ingest(
        str(tmp_path / "p"), voxel_size_nm=VOXEL, chunk_shape=(2, 8, 8), shard_shape=(6, 16, 16)
    )
    assert plan.z_unit == 6 and plan.z_ranges == ((0, 6), (6, 12), (12, 18), (18, 21))
    # Chunks larger than the volume are clipped to it.
    plan = plan_ingest(str(tmp_path / "p"), voxel_size_nm=VOXEL, chunk_shape=(64, 512, 512))
    assert plan.chunk_shape == (21, 40, 36) and plan.z_ranges == ((0, 21),)


@pytest.mark.parametrize(
    ("layout", "field"),
    [
        ({"slices_per_task": 6}, "slices_per_task"),
        ({"slices_per_task": -4}, "slices_per_task"),
        ({"chunk_shape": (4, 0, 16)}, "chunk_shape"),
        ({"chunk_shape": (4, 16)}, "chunk_shape"),
        ({"shard_shape": (6, 16, 16)}, "shard_shape"),
        ({"voxel_size_nm": (40, 0, 6)}, "voxel_size_nm"),
        ({"voxel_size_nm": ()}, "voxel_size_nm"),
    ],
)
def test_bad_layout_is_refused_before_anything_is_written(
    tmp_path: Path, store: Store, layout: dict[str, object], field: str
) -> None:
    png_stack(tmp_path / "p", z=8)
    args: dict[str, object] = {"voxel_size_nm": VOXEL, "chunk_shape": (4, 16, 16), **layout}
    with pytest.raises(InvalidArgumentError) as err:
        ingest(str(tmp_path / "p"), store, "volumes/v.zarr", **args)  # type: ignore[arg-type]
    assert err.value.field == field
    assert field in err.value.message
    assert not store.exists("volumes/v.zarr")


def test_voxel_size_comes_from_file_metadata_when_not_given(tmp_path: Path, store: Store) -> None:
    data = RNG.integers(0, 3000, size=(3, 8, 8), dtype=np.int16)
    with mrcfile.new(tmp_path / "v.mrc") as mrc:
        mrc.set_data(data)
        mrc.voxel_size = (20.0, 20.0, 50.0)
    result = ingest(str(tmp_path / "v.mrc"), store, "volumes/m.zarr")
    assert result.voxel_size_nm == (5.0, 2.0, 2.0) and result.dtype == "int16"
    np.testing.assert_array_equal(store.open_volume("volumes/m.zarr")[:], data)


def test_failure_midway_deletes_the_partial_volume(tmp_path: Path, store: Store) -> None:
    png_stack(tmp_path / "p", z=12)
    # Damage a late slice; the unverified source only finds out while writing.
    bad = tmp_path / "p" / "p10.png"
    bad.write_bytes(bad.read_bytes()[:60])
    source = open_source(str(tmp_path / "p"), verify=False)
    with pytest.raises(InvalidArgumentError) as err:
        ingest(
            source, store, "volumes/v.zarr", voxel_size_nm=VOXEL, chunk_shape=(2, 16, 16), workers=2
        )
    assert "p10.png" in err.value.message
    assert not store.exists("volumes/v.zarr")
    assert list(store.walk_files("volumes")) == []


def test_verified_source_fails_before_creating_anything(tmp_path: Path, store: Store) -> None:
    png_stack(tmp_path / "p", z=6)
    bad = tmp_path / "p" / "p5.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(InvalidArgumentError) as err:
        ingest(str(tmp_path / "p"), store, "volumes/v.zarr", voxel_size_nm=VOXEL)
    assert "p5.png" in err.value.message
    assert not store.exists("volumes")


def test_cancellation_deletes_the_partial_volume(tmp_path: Path, store: Store) -> None:
    png_stack(tmp_path / "p", z=12)
    cancelled = threading.Event()
    events: list[ProgressEvent] = []

    def observe(event: ProgressEvent) -> None:
        events.append(event)
        if event.tasks_done >= 1:
            cancelled.set()

    with pytest.raises(CancelledError):
        ingest(
            str(tmp_path / "p"),
            store,
            "volumes/v.zarr",
            voxel_size_nm=VOXEL,
            chunk_shape=(2, 16, 16),
            workers=1,
            observer=observe,
            cancelled=cancelled,
        )
    assert not store.exists("volumes/v.zarr")
    assert events[-1].state == "FAILED"
    assert max(e.tasks_done for e in events) < 6


def test_existing_volume_needs_overwrite(tmp_path: Path, store: Store) -> None:
    first = png_stack(tmp_path / "a", z=4)
    second = png_stack(tmp_path / "b", z=5)
    ingest(str(tmp_path / "a"), store, "volumes/v.zarr", voxel_size_nm=VOXEL)
    with pytest.raises(AlreadyExistsError) as err:
        ingest(str(tmp_path / "b"), store, "volumes/v.zarr", voxel_size_nm=VOXEL)
    assert "volumes/v.zarr" in err.value.message
    np.testing.assert_array_equal(store.open_volume("volumes/v.zarr")[:], first)
    ingest(str(tmp_path / "b"), store, "volumes/v.zarr", voxel_size_nm=VOXEL, overwrite=True)
    np.testing.assert_array_equal(store.open_volume("volumes/v.zarr")[:], second)


def test_task_pieces_interrupted_volume_never_looks_complete(tmp_path: Path, store: Store) -> None:
    data = png_stack(tmp_path / "p", z=10)
    source = str(tmp_path / "p")
    plan = plan_ingest(source, voxel_size_nm=VOXEL, chunk_shape=(4, 16, 16))
    create_ingest_volume(store, "volumes/t.zarr", plan)
    first, *rest = plan.z_ranges
    ingest_range(source, store, "volumes/t.zarr", *first)
    # As if the worker was killed here: the volume is refused to readers.
    assert not store.volume_info("volumes/t.zarr").complete
    with pytest.raises(FailedPreconditionError):
        store.open_volume("volumes/t.zarr")
    # A retried range rewrites the same bytes.
    for z_range in [first, *rest, rest[0]]:
        ingest_range(source, store, "volumes/t.zarr", *z_range)
    info = finalize_ingest(store, "volumes/t.zarr", source=source)
    assert info.complete and info.attributes["source"] == source
    np.testing.assert_array_equal(store.open_volume("volumes/t.zarr")[:], data)


def test_ingest_range_refuses_misaligned_ranges_and_missing_volumes(
    tmp_path: Path, store: Store
) -> None:
    png_stack(tmp_path / "p", z=10)
    source = str(tmp_path / "p")
    with pytest.raises(NotFoundError):
        ingest_range(source, store, "volumes/none.zarr", 0, 4)
    plan = plan_ingest(source, voxel_size_nm=VOXEL, chunk_shape=(4, 16, 16))
    create_ingest_volume(store, "volumes/t.zarr", plan)
    for z0, z1 in ((1, 4), (0, 5), (8, 11), (4, 4)):
        with pytest.raises(InvalidArgumentError) as err:
            ingest_range(source, store, "volumes/t.zarr", z0, z1)
        assert err.value.field == "z_range"
    ingest_range(source, store, "volumes/t.zarr", 8, 10)  # the short last range is fine
    other = tmp_path / "other"
    png_stack(other, z=10, x=20)
    with pytest.raises(FailedPreconditionError):
        ingest_range(str(other), store, "volumes/t.zarr", 0, 4)


def test_zarr_source_is_copied_with_a_new_layout(tmp_path: Path, store: Store) -> None:
    data = RNG.integers(0, 65535, size=(9, 30, 20), dtype=np.uint16)
    src_store = Store(f"file://{tmp_path / 'src'}")
    src_store.create_volume(
        "volumes/in.zarr", data.shape, "uint16", voxel_size_nm=(8, 8, 8), chunk_shape=(3, 10, 10)
    )[:] = data
    src_store.mark_complete("volumes/in.zarr")
    result = ingest(
        src_store.key_url("volumes/in.zarr"),
        store,
        "volumes/out.zarr",
        chunk_shape=(4, 32, 32),
        shard_shape=(8, 32, 32),
    )
    assert result.voxel_size_nm == (8.0, 8.0, 8.0)
    info = store.volume_info("volumes/out.zarr")
    # Chunks and shards are clipped to the 30 x 20 slices; shards stay whole chunks.
    assert info.shard_shape == (8, 30, 20) and info.chunk_shape == (4, 30, 20)
    np.testing.assert_array_equal(store.open_volume("volumes/out.zarr")[:], data)


KILLED_INGEST = """
import sys, threading
from deep3m.core.ingest import ingest
from deep3m.core.store import Store

def observe(event):
    if event.tasks_done >= 2:
        print("written", flush=True)
        threading.Event().wait()  # hold here until killed, mid-ingest

ingest(sys.argv[1], Store(sys.argv[2]), "volumes/k.zarr", voxel_size_nm=(1, 1, 1),
       chunk_shape=(1, 16, 16), workers=1, observer=observe)
"""


def test_a_killed_ingest_never_looks_complete(tmp_path: Path) -> None:
    png_stack(tmp_path / "p", z=6)
    store_url = f"file://{tmp_path / 'store'}"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_INGEST, str(tmp_path / "p"), store_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"written\n", proc.stderr.read() if proc.stderr else b""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    store = Store(store_url)
    info = store.volume_info("volumes/k.zarr")
    assert not info.complete
    with pytest.raises(FailedPreconditionError):
        store.open_volume("volumes/k.zarr")
    # Two slices were done before the kill, a third may have been in flight (at most
    # 2 x workers ranges are), the last three were never started.
    written = store.open_volume("volumes/k.zarr", require_complete=False)[:]
    assert written[0].any() and written[1].any()
    assert not written[3:].any()
