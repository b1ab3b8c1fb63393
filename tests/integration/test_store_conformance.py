"""One conformance suite for every store backend: file://, memory:// and s3:// (SeaweedFS).

The same test functions run against each backend, so a behaviour that differs
between a laptop (file), unit tests (memory) and the cluster (S3) shows up here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from deep3m.core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from deep3m.core.store import Store

BACKENDS = ["file", "memory", pytest.param("s3", marks=pytest.mark.s3)]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    kind = request.param
    if kind == "file":
        yield Store(f"file://{tmp_path / 'store'}")
        return
    if kind == "memory":
        s = Store(f"memory://conformance-{uuid.uuid4().hex[:10]}")
    else:
        server = request.getfixturevalue("s3_server")
        s = Store(server.url(f"conformance-{uuid.uuid4().hex[:10]}"), server.storage_options)
    yield s
    for name in s.list(""):
        s.delete(name)


def test_volume_round_trip(store: Store) -> None:
    data = np.arange(6 * 20 * 12, dtype=np.uint16).reshape(6, 20, 12)
    arr = store.create_volume(
        "volumes/a.zarr", data.shape, "uint16", voxel_size_nm=(50, 4, 4), chunk_shape=(2, 8, 8)
    )
    arr[:] = data
    store.mark_complete("volumes/a.zarr")
    back = store.open_volume("volumes/a.zarr")
    assert back.dtype == np.uint16 and back.shape == data.shape
    np.testing.assert_array_equal(back[:], data)
    np.testing.assert_array_equal(back[2:5, 3:17, 1:2], data[2:5, 3:17, 1:2])
    info = store.volume_info("volumes/a.zarr")
    assert info.complete and info.shape == data.shape and info.dtype == "uint16"


def test_ome_zarr_metadata(store: Store) -> None:
    store.create_volume("volumes/m.zarr", (4, 8, 8), "uint8", voxel_size_nm=(40.0, 5.9, 5.9))
    group = zarr.open_group(store.zarr_store("volumes/m.zarr", read_only=True), mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert {a["type"] for a in ms["axes"]} == {"space"}
    assert {a["unit"] for a in ms["axes"]} == {"nanometer"}
    (dataset,) = ms["datasets"]
    assert dataset["path"] == "0"
    assert dataset["coordinateTransformations"] == [{"type": "scale", "scale": [40.0, 5.9, 5.9]}]
    arr = group["0"]
    assert isinstance(arr, zarr.Array)
    assert arr.metadata.zarr_format == 3
    assert tuple(arr.metadata.dimension_names) == ("z", "y", "x")  # type: ignore[union-attr]
    assert store.volume_info("volumes/m.zarr").voxel_size_nm == (40.0, 5.9, 5.9)


def test_chunk_and_shard_shapes_are_honoured(store: Store) -> None:
    data = np.random.default_rng(0).integers(0, 255, size=(8, 16, 16), dtype=np.uint8)
    plain = store.create_volume("volumes/c.zarr", data.shape, "uint8", chunk_shape=(2, 8, 8))
    plain[:] = data
    sharded = store.create_volume(
        "volumes/s.zarr", data.shape, "uint8", chunk_shape=(2, 8, 8), shard_shape=(4, 16, 16)
    )
    sharded[:] = data
    assert plain.chunks == (2, 8, 8) and plain.shards is None
    assert sharded.chunks == (2, 8, 8) and sharded.shards == (4, 16, 16)
    info = store.volume_info("volumes/s.zarr")
    assert info.chunk_shape == (2, 8, 8) and info.shard_shape == (4, 16, 16)
    # One stored object per chunk, or per shard.
    chunk_keys = [k for k in store.walk_files("volumes/c.zarr/0") if "/c/" in k]
    shard_keys = [k for k in store.walk_files("volumes/s.zarr/0") if "/c/" in k]
    assert len(chunk_keys) == 4 * 2 * 2
    assert len(shard_keys) == 2
    np.testing.assert_array_equal(
        store.open_volume("volumes/s.zarr", require_complete=False)[:], data
    )
    with pytest.raises(InvalidArgumentError) as err:
        store.create_volume(
            "volumes/bad.zarr", (8, 8, 8), "uint8", chunk_shape=(2, 4, 4), shard_shape=(3, 4, 4)
        )
    assert err.value.field == "shard_shape"
    assert not store.exists("volumes/bad.zarr")


def test_json_documents_round_trip(store: Store) -> None:
    doc = {"name": "mito ✓", "sizes": [1, 2.5, None], "nested": {"ok": True}}
    store.write_json("jobs/j1/job.json", doc)
    assert store.read_json("jobs/j1/job.json") == doc
    store.write_json("jobs/j1/job.json", {"replaced": 1})
    assert store.read_json("jobs/j1/job.json") == {"replaced": 1}
    store.write_bytes("jobs/j1/raw.bin", b"\x00\x01\xff")
    assert store.read_bytes("jobs/j1/raw.bin") == b"\x00\x01\xff"
    with pytest.raises(NotFoundError) as err:
        store.read_json("jobs/j1/missing.json")
    assert "missing.json" in err.value.message
    store.write_bytes("jobs/j1/broken.json", b"{not json")
    with pytest.raises(InvalidArgumentError) as bad:
        store.read_json("jobs/j1/broken.json")
    assert "broken.json" in bad.value.message


def test_list_and_delete(store: Store) -> None:
    for name in ("a", "b", "c"):
        store.write_json(f"jobs/{name}/job.json", {"id": name})
    store.write_json("jobs/b/extra/x.json", {})
    assert store.list("jobs") == ["a", "b", "c"]
    assert store.list("jobs/b") == ["extra", "job.json"]
    assert store.list("nothing-here") == []
    assert sorted(store.walk_files("jobs/b")) == ["jobs/b/extra/x.json", "jobs/b/job.json"]
    store.delete("jobs/b")
    assert store.list("jobs") == ["a", "c"]
    assert not store.exists("jobs/b/job.json")
    store.delete("jobs/b")  # deleting what is gone is fine
    store.delete("jobs/a/job.json")
    assert store.list("jobs") == ["c"]
    with pytest.raises(InvalidArgumentError):
        store.delete("")


def test_incomplete_volumes_are_refused(store: Store) -> None:
    arr = store.create_volume("volumes/i.zarr", (2, 4, 4), "uint8")
    arr[:] = 3
    assert not store.volume_info("volumes/i.zarr").complete
    with pytest.raises(FailedPreconditionError) as err:
        store.open_volume("volumes/i.zarr")
    assert "incomplete" in err.value.message
    assert store.open_volume("volumes/i.zarr", require_complete=False)[0, 0, 0] == 3
    store.mark_complete("volumes/i.zarr")
    assert store.open_volume("volumes/i.zarr")[1, 3, 3] == 3


def test_missing_and_existing_volumes(store: Store) -> None:
    with pytest.raises(NotFoundError) as err:
        store.open_volume("volumes/none.zarr")
    assert "volumes/none.zarr" in err.value.message
    with pytest.raises(NotFoundError):
        store.volume_info("volumes/none.zarr")
    store.create_volume("volumes/e.zarr", (2, 4, 4), "uint8")
    with pytest.raises(AlreadyExistsError):
        store.create_volume("volumes/e.zarr", (2, 4, 4), "uint8")
    store.create_volume("volumes/e.zarr", (3, 4, 4), "uint8", overwrite=True)
    assert store.volume_info("volumes/e.zarr").shape == (3, 4, 4)


@pytest.mark.parametrize("key", ["../outside", "a/../../b", "/etc/passwd", "a\\..\\b"])
def test_paths_escaping_the_root_are_refused(store: Store, key: str) -> None:
    for call in (
        lambda: store.write_json(key, {}),
        lambda: store.read_bytes(key),
        lambda: store.create_volume(key, (1, 1, 1), "uint8"),
        lambda: store.open_volume(key),
        lambda: store.delete(key),
        lambda: store.exists(key),
    ):
        with pytest.raises(InvalidArgumentError) as err:
            call()
        assert err.value.field == "path"
    assert store.list("") == []
