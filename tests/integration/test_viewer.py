"""``deep3m view``: the loopback server (CORS, byte ranges, the Neuroglancer client) and
the link it prints, rendered in a real headless Chromium on real EM slices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from deep3m.client import volumes as ops
from deep3m.client.viewer import Layer, Viewer, default_layers, parse_range
from deep3m.core.errors import InvalidArgumentError, NotFoundError
from deep3m.core.store import Store
from deep3m.launcher.local import free_port
from deep3m.testing.browser import find_chromium, screenshot
from deep3m.testing.seaweed import SeaweedServer
from PIL import Image

SLICES = 4
CROP = 256
VOXEL_NM = (40.0, 5.9, 5.9)


@pytest.fixture(scope="module")
def em(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Four real SBEM slices (cropped), a probability map made from their mitochondria
    labels, and its labelled objects, in a ``file://`` store."""
    folder = data_dir / "cdeep3m-mito" / "validation"
    images = sorted((folder / "images").glob("*.png"))[:SLICES]
    labels = sorted((folder / "labels").glob("*.png"))[:SLICES]
    image = np.stack([np.asarray(Image.open(p))[:CROP, :CROP] for p in images])
    mask = np.stack([np.asarray(Image.open(p))[:CROP, :CROP] for p in labels]) > 0
    store = Store(f"file://{tmp_path_factory.mktemp('em')}/store")
    for path, data, kind in (
        ("volumes/em.zarr", image, ""),
        ("volumes/prob.zarr", np.where(mask, 0.9, 0.05).astype(np.float32), "probabilities"),
    ):
        arr = store.create_volume(
            path, data.shape, data.dtype, voxel_size_nm=VOXEL_NM, chunk_shape=(2, 64, 64),
            attributes={"kind": kind} if kind else {},
        )  # fmt: skip
        arr[:] = data
        store.mark_complete(path)
    ops.label(store, "volumes/prob.zarr", threshold=0.5, workers=1)
    return store


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_parse_range() -> None:
    assert parse_range("bytes=0-9", 100) == (0, 10)
    assert parse_range("bytes=90-", 100) == (90, 100)
    assert parse_range("bytes=-16", 100) == (84, 100)
    assert parse_range("bytes=95-200", 100) == (95, 100)
    for bad in ("bytes=100-", "items=0-1", "bytes=a-b", "bytes=0-1,4-5", "bytes=5"):
        with pytest.raises(InvalidArgumentError, match="Range"):
            parse_range(bad, 100)


def test_server_ranges_cors_client_files_and_errors(em: Store) -> None:
    layers = default_layers(em, "volumes/em.zarr", probabilities="volumes/prob.zarr")
    assert [(x.kind, x.path) for x in layers] == [
        ("image", "volumes/em.zarr"),
        ("probabilities", "volumes/prob.zarr"),
        ("segmentation", "volumes/prob.zarr/labels/segmentation"),
    ]
    with Viewer(em, layers) as viewer:
        assert viewer.url.startswith("http://127.0.0.1:") and viewer.port > 0
        status, headers, body = _get(f"{viewer.url}/data/volumes/em.zarr/zarr.json")
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
        assert json.loads(body) == em.read_json("volumes/em.zarr/zarr.json")
        chunk = next(k for k in em.walk_files("volumes/em.zarr/0/c"))
        whole = em.read_bytes(chunk)
        status, headers, part = _get(f"{viewer.url}/data/{chunk}", {"Range": "bytes=3-10"})
        assert status == 206 and part == whole[3:11]
        assert headers["Content-Range"] == f"bytes 3-10/{len(whole)}"
        status, _, tail = _get(f"{viewer.url}/data/{chunk}", {"Range": "bytes=-5"})
        assert status == 206 and tail == whole[-5:]
        status, _, _ = _get(f"{viewer.url}/data/{chunk}", {"Range": f"bytes={len(whole)}-"})
        assert status == 416
        status, headers, page = _get(f"{viewer.url}/")
        assert status == 200 and b"neuroglancer" in page and "text/html" in headers["Content-Type"]
        assert viewer.link.startswith(f"{viewer.url}/v/deep3m/#!")
        assert _get(f"{viewer.url}/data/volumes/none.zarr/zarr.json")[0] == 404
        assert _get(f"{viewer.url}/..%2F..%2Fetc/passwd")[0] == 404
        # Preflight for ranged reads from another origin.
        request = urllib.request.Request(f"{viewer.url}/data/{chunk}", method="OPTIONS")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 204
            assert "Range" in response.headers["Access-Control-Allow-Headers"]
        state = json.loads(unquote(viewer.link.split("#!", 1)[1]))
        sources = [layer["source"] for layer in state["layers"]]
        assert sources == [f"zarr3://{viewer.url}/data/{x.path}/" for x in layers]
        assert [layer["type"] for layer in state["layers"]] == ["image", "image", "segmentation"]
    assert ("/data/volumes/em.zarr/zarr.json", 200) in viewer.log.entries


def test_viewer_refuses_missing_volumes_and_s3_modes_on_files(em: Store) -> None:
    with pytest.raises(NotFoundError, match=r"volumes/nope\.zarr"):
        Viewer(em, [Layer("image", "volumes/nope.zarr", "image")])
    with pytest.raises(InvalidArgumentError, match=r"s3://"):
        Viewer(em, [Layer("image", "volumes/em.zarr", "image")], s3="presign")


def _panel_is_rendered(png: Path) -> tuple[int, float]:
    """Distinct colours and their spread in the view panels (the top bar excluded)."""
    pixels = np.asarray(Image.open(png).convert("RGB"))[60:-10, 10:-10]
    return len(np.unique(pixels.reshape(-1, 3), axis=0)), float(pixels.std())


@pytest.fixture
def chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip("chromium not found (apt-get install chromium; .ci/run installs it)")
    return found


@pytest.fixture
def served(em: Store) -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    """``deep3m view`` as a user runs it, in its own process; its first line is the report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEP3M_")}
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "deep3m.client.cli", "--output", "json", "view",
            "volumes/em.zarr", "--probabilities", "volumes/prob.zarr", "--port", str(port),
            "--store", em.url,
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"deep3m view printed nothing: {proc.communicate(timeout=30)[1]}")
        report = json.loads(line)
        assert report["url"] == f"http://127.0.0.1:{port}"
        yield proc, report
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def test_cli_view_prints_a_link_it_serves(
    served: tuple[subprocess.Popen[str], dict[str, object]],
) -> None:
    _, report = served
    layers = report["layers"]
    assert isinstance(layers, list)
    assert [x["kind"] for x in layers] == ["image", "probabilities", "segmentation"]
    link, url = str(report["link"]), str(report["url"])
    assert link.startswith(f"{url}/v/deep3m/#!")
    status, _, page = _get(link.split("#", 1)[0])
    assert status == 200 and b"main." in page
    state = json.loads(unquote(link.split("#!", 1)[1]))
    for layer in state["layers"]:
        base = layer["source"].removeprefix("zarr3://")
        status, _, meta = _get(f"{base}zarr.json")
        assert status == 200 and json.loads(meta)["node_type"] == "group"


@pytest.mark.slow
def test_link_renders_image_probabilities_and_segmentation_in_chromium(
    chromium: str, em: Store, tmp_path: Path
) -> None:
    layers = default_layers(em, "volumes/em.zarr", probabilities="volumes/prob.zarr")
    # A held event stream would keep the headless page loading past its time budget.
    with Viewer(em, layers, hold_events=False, meshes=True) as viewer:
        shot = screenshot(viewer.link, tmp_path / "viewer.png", budget_ms=30_000)
    colours, spread = _panel_is_rendered(shot)
    # An error page or an empty viewer is a few flat colours; EM data is thousands.
    assert colours > 500 and spread > 10, (colours, spread)
    # The browser loaded the client and read every layer's chunks, not just metadata.
    answered = viewer.log.paths()
    assert any(p.startswith("/v/deep3m/main.") and p.endswith(".js") for p in answered)
    assert "/events/deep3m" in answered
    for layer in layers:
        chunks = [p for p in answered if p.startswith(f"/data/{layer.path}/0/c/")]
        assert chunks, (layer.path, answered)
    meshes = [p for p in answered if p.startswith("/meshes/2/") and p[10:].isdigit()]
    assert meshes, answered  # the 3-D panel asked for the objects' meshes
    # Chunks never written (all background) are absent (404); nothing else may fail.
    failed = [(p, s) for p, s in viewer.log.entries if s >= 400 and s != 404]
    assert not failed, failed


@pytest.mark.s3
def test_s3_store_proxied_presigned_and_public(s3_server: SeaweedServer, s3_prefix: str) -> None:
    store = Store(s3_prefix, s3_server.storage_options)
    data = np.arange(4 * 32 * 32, dtype=np.uint16).reshape(4, 32, 32)
    arr = store.create_volume(
        "volumes/v.zarr", data.shape, data.dtype, voxel_size_nm=VOXEL_NM, chunk_shape=(2, 16, 16)
    )
    arr[:] = data
    store.mark_complete("volumes/v.zarr")
    chunk = next(iter(store.walk_files("volumes/v.zarr/0/c")))
    whole = store.read_bytes(chunk)
    layers = [Layer("image", "volumes/v.zarr", "image")]
    # proxy: read here with the store's credentials, ranges included.
    with Viewer(store, layers) as viewer:
        status, _, part = _get(f"{viewer.url}/data/{chunk}", {"Range": "bytes=-4"})
        assert status == 206 and part == whole[-4:]
    # presign: the server redirects to a pre-signed URL that reads without credentials.
    with Viewer(store, layers, s3="presign") as viewer:
        request = urllib.request.Request(f"{viewer.url}/data/{chunk}")
        opener = urllib.request.build_opener(_NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as redirect:
            opener.open(request, timeout=30)
        redirect.value.close()
        assert redirect.value.code == 307
        target = redirect.value.headers["Location"]
        assert "Signature" in target or "X-Amz-Signature" in target
        with urllib.request.urlopen(target, timeout=30) as response:
            assert response.read() == whole
    # public: the link names the bucket's own HTTP URL.
    with Viewer(store, layers, s3="public", storage_options=s3_server.storage_options) as viewer:
        source = viewer.state["layers"][0]["source"]
        bucket_path = s3_prefix.removeprefix("s3://")
        assert source == f"zarr3://{s3_server.endpoint_url}/{bucket_path}/volumes/v.zarr/"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_meshes_are_served_as_legacy_precomputed_fragments(em: Store) -> None:
    seg = "volumes/prob.zarr/labels/segmentation"
    layers = default_layers(em, "volumes/em.zarr", probabilities="volumes/prob.zarr")
    labels = np.asarray(em.open_volume(seg)[:])
    ids = sorted(int(i) for i in np.unique(labels) if i)
    with Viewer(em, layers, meshes=True) as viewer:
        state = viewer.state["layers"][2]
        assert state["source"][1] == f"precomputed://{viewer.url}/meshes/2"
        assert state["segments"] == [str(i) for i in ids]
        status, _, info = _get(f"{viewer.url}/meshes/2/info")
        assert status == 200 and json.loads(info) == {"@type": "neuroglancer_legacy_mesh"}
        largest = int(np.bincount(labels.ravel())[1:].argmax()) + 1
        _, _, manifest = _get(f"{viewer.url}/meshes/2/{largest}:0")
        assert json.loads(manifest) == {"fragments": [str(largest)]}
        status, _, fragment = _get(f"{viewer.url}/meshes/2/{largest}")
        assert status == 200 and _get(f"{viewer.url}/meshes/2/999999")[0] == 404
    count = int(np.frombuffer(fragment[:4], np.uint32)[0])
    vertices = np.frombuffer(fragment[4 : 4 + 12 * count], np.float32).reshape(-1, 3)
    # The surface encloses the object: its vertices span the object's box, in nm (x, y, z).
    z, y, x = np.nonzero(labels == largest)
    lo = np.array([x.min(), y.min(), z.min()]) * np.array(VOXEL_NM[::-1])
    hi = np.array([x.max() + 1, y.max() + 1, z.max() + 1]) * np.array(VOXEL_NM[::-1])
    step = np.array(VOXEL_NM[::-1])
    assert (vertices.min(axis=0) >= lo - step).all() and (vertices.max(axis=0) <= hi + step).all()
    assert (vertices.max(axis=0) - vertices.min(axis=0) >= (hi - lo) - 2 * step).all()
