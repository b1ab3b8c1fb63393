"""One conformance suite for every store backend: file://, memory:// and s3:// (SeaweedFS).

The same test functions run against each backend, so a behaviour that differs
between a laptop (file), unit tests (memory) and the cluster (S3) shows up here.
Each backend also comes with a ``Raw`` view that reaches its objects without the
store under test (the local disk, fsspec's memory dict, botocore straight to the
S3 server), so a bug that is symmetric between the store's writes and reads —
a wrong key, a wrong encoding — is caught too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import botocore.session
import fsspec
import numcodecs
import numpy as np
import pytest
import zarr
from deep3m.core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from deep3m.core.store import FileStore, MemoryStore, S3Store, Store
from deep3m.testing.seaweed import SeaweedServer

BACKENDS = ["file", "memory", pytest.param("s3", marks=pytest.mark.s3)]


class Raw(Protocol):
    """Objects of a store, reached without it: keys are relative to the store root."""

    def set_raw(self, key: str, data: bytes) -> None: ...

    def get_raw(self, key: str) -> bytes | None: ...

    def keys_raw(self, prefix: str) -> set[str]: ...


@dataclass
class FileRaw:
    root: Path

    def set_raw(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def get_raw(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def keys_raw(self, prefix: str) -> set[str]:
        base = self.root / prefix
        # Directories count too: an empty one left behind would still be listed.
        return {str(p.relative_to(self.root)) for p in base.rglob("*")} if base.exists() else set()


@dataclass
class MemoryRaw:
    root: str  # "/name" in fsspec's memory filesystem

    @property
    def objects(self) -> dict[str, Any]:
        return fsspec.filesystem("memory").store  # type: ignore[no-any-return]

    def set_raw(self, key: str, data: bytes) -> None:
        # Through fsspec's own file object, so the entry has the shape fsspec expects.
        with fsspec.filesystem("memory").open(f"{self.root}/{key}", "wb") as fh:
            fh.write(data)

    def get_raw(self, key: str) -> bytes | None:
        entry = self.objects.get(f"{self.root}/{key}")
        return None if entry is None else bytes(entry.getvalue())

    def keys_raw(self, prefix: str) -> set[str]:
        base = f"{self.root}/{prefix}"
        return {k[len(self.root) + 1 :] for k in self.objects if k.startswith(base)}


@dataclass
class S3Raw:
    client: Any
    bucket: str
    prefix: str

    def set_raw(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=data)

    def get_raw(self, key: str) -> bytes | None:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")
        except self.client.exceptions.NoSuchKey:
            return None
        return bytes(reply["Body"].read())

    def keys_raw(self, prefix: str) -> set[str]:
        found: set[str] = set()
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/{prefix}"
        )
        for page in pages:
            found.update(o["Key"][len(self.prefix) + 1 :] for o in page.get("Contents", []))
        return found


def _s3_client(server: SeaweedServer) -> Any:
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
    )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Raw]]:
    kind = request.param
    name = f"conformance-{uuid.uuid4().hex[:10]}"
    if kind == "file":
        root = tmp_path / "store"
        yield Store(f"file://{root}"), FileRaw(root)
        return
    if kind == "memory":
        s: Store = Store(f"memory://{name}")
        raw: Raw = MemoryRaw(f"/{name}")
    else:
        server = request.getfixturevalue("s3_server")
        s = Store(server.url(name), server.storage_options)
        raw = S3Raw(_s3_client(server), server.bucket, name)
    yield s, raw
    for entry in s.list(""):
        s.delete(entry)
    if isinstance(raw, S3Raw):
        raw.client.close()


@pytest.fixture
def store(backend: tuple[Store, Raw]) -> Store:
    return backend[0]


def test_the_url_picks_the_backend(backend: tuple[Store, Raw]) -> None:
    store, _ = backend
    expected = {"file": FileStore, "memory": MemoryStore, "s3": S3Store}[store.url.split(":")[0]]
    assert type(store) is expected and isinstance(store, Store)


def test_documents_land_under_their_key(backend: tuple[Store, Raw]) -> None:
    store, raw = backend
    store.write_bytes("jobs/j1/raw.bin", b"\x00\x01\xff")
    assert raw.get_raw("jobs/j1/raw.bin") == b"\x00\x01\xff"
    doc = {"name": "mito ✓", "sizes": [1, 2.5, None]}
    store.write_json("jobs/j1/job.json", doc)
    stored = raw.get_raw("jobs/j1/job.json")
    assert stored is not None and json.loads(stored) == doc
    # Nothing else was written: no partial or temporary objects remain.
    assert {k for k in raw.keys_raw("jobs/j1") if "." in k.rsplit("/", 1)[-1]} == {
        "jobs/j1/raw.bin",
        "jobs/j1/job.json",
    }


def test_objects_written_outside_are_read_listed_and_deleted(backend: tuple[Store, Raw]) -> None:
    store, raw = backend
    raw.set_raw("models/m/model.json", json.dumps({"id": "m"}).encode())
    raw.set_raw("models/m/1fm/weights.safetensors", b"w" * 100)
    raw.set_raw("models/n/model.json", b"{}")
    assert store.read_json("models/m/model.json") == {"id": "m"}
    assert store.read_bytes("models/m/1fm/weights.safetensors") == b"w" * 100
    assert store.exists("models/m/1fm")
    assert store.list("models") == ["m", "n"]
    assert sorted(store.walk_files("models/m")) == [
        "models/m/1fm/weights.safetensors",
        "models/m/model.json",
    ]
    store.delete("models/m")
    assert raw.get_raw("models/m/model.json") is None
    assert raw.keys_raw("models/m") == set()
    assert store.list("models") == ["n"]
    assert raw.get_raw("models/n/model.json") == b"{}"


def test_sizes_and_byte_ranges_of_objects_written_outside(backend: tuple[Store, Raw]) -> None:
    store, raw = backend
    data = bytes(range(256)) * 3
    raw.set_raw("volumes/v.zarr/0/c/0/0/0", data)
    assert store.size("volumes/v.zarr/0/c/0/0/0") == len(data)
    assert store.read_range("volumes/v.zarr/0/c/0/0/0", 10, 20) == data[10:20]
    assert store.read_range("volumes/v.zarr/0/c/0/0/0", len(data) - 4, len(data)) == data[-4:]
    with pytest.raises(NotFoundError, match="nothing"):
        store.size("volumes/nothing")
    with pytest.raises(NotFoundError, match="nothing"):
        store.read_range("volumes/nothing", 0, 1)


def test_partial_documents_are_not_listed(backend: tuple[Store, Raw]) -> None:
    store, raw = backend
    raw.set_raw("jobs/a/job.json", b"{}")
    raw.set_raw("jobs/a/done.json.tmp", b"{")
    assert store.list("jobs/a") == ["job.json"]


def test_volumes_are_written_as_ome_zarr_v3(backend: tuple[Store, Raw]) -> None:
    store, raw = backend
    data = np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8)
    arr = store.create_volume(
        "volumes/v.zarr", data.shape, "uint16", voxel_size_nm=(40, 6, 6), chunk_shape=(2, 8, 8)
    )
    arr[:] = data
    store.mark_complete("volumes/v.zarr", source="raw-test")
    group = json.loads(raw.get_raw("volumes/v.zarr/zarr.json") or b"null")
    assert group["zarr_format"] == 3 and group["node_type"] == "group"
    assert group["attributes"]["deep3m"] == {"complete": True, "source": "raw-test"}
    (dataset,) = group["attributes"]["ome"]["multiscales"][0]["datasets"]
    assert dataset == {
        "path": "0",
        "coordinateTransformations": [{"type": "scale", "scale": [40.0, 6.0, 6.0]}],
    }
    meta = json.loads(raw.get_raw("volumes/v.zarr/0/zarr.json") or b"null")
    assert meta["shape"] == [4, 8, 8] and meta["data_type"] == "uint16"
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [2, 8, 8]
    codecs = [c["name"] for c in meta["codecs"]]
    assert codecs[0] == "bytes" and meta["codecs"][0]["configuration"]["endian"] == "little"
    # Decode the second chunk by hand: the bytes codec, then each compressor named.
    blob = raw.get_raw("volumes/v.zarr/0/c/1/0/0")
    assert blob is not None
    for name in reversed(codecs[1:]):
        assert name == "zstd", f"unexpected codec {name}"
        blob = numcodecs.Zstd().decode(blob)
    chunk = np.frombuffer(bytes(blob), dtype="<u2").reshape(2, 8, 8)
    np.testing.assert_array_equal(chunk, data[2:4])


def test_volumes_written_outside_are_read(backend: tuple[Store, Raw]) -> None:
    store, raw = backend
    data = np.arange(2 * 4 * 6, dtype=np.uint16).reshape(2, 4, 6) * 7
    scale = {"type": "scale", "scale": [30.0, 4.0, 4.0]}
    group = {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {
            "ome": {
                "version": "0.5",
                "multiscales": [
                    {
                        "name": "outside",
                        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
                        "datasets": [{"path": "0", "coordinateTransformations": [scale]}],
                    }
                ],
            },
            "deep3m": {"complete": True},
        },
    }
    array = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [2, 4, 6],
        "data_type": "uint16",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, 4, 6]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "attributes": {},
        "dimension_names": ["z", "y", "x"],
    }
    raw.set_raw("volumes/o.zarr/zarr.json", json.dumps(group).encode())
    raw.set_raw("volumes/o.zarr/0/zarr.json", json.dumps(array).encode())
    for z in range(2):
        raw.set_raw(f"volumes/o.zarr/0/c/{z}/0/0", data[z].astype("<u2").tobytes())
    info = store.volume_info("volumes/o.zarr")
    assert info.complete and info.shape == (2, 4, 6) and info.dtype == "uint16"
    assert info.voxel_size_nm == (30.0, 4.0, 4.0) and info.chunk_shape == (1, 4, 6)
    np.testing.assert_array_equal(store.open_volume("volumes/o.zarr")[:], data)


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
