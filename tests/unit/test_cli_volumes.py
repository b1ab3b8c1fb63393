"""The volume commands of ``deep3m`` (describe, label, evaluate, pyramid, export, models,
doctor) on a real ``file://`` store, checked against direct numpy/scipy computations."""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tifffile
from deep3m.client.cli import app
from deep3m.core.metrics import confusion_counts
from deep3m.core.store import Store
from deep3m.models.card import MemberCard, ModelCard, save_card
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner, Result

pytestmark = pytest.mark.usefixtures("isolated")

SHAPE = (6, 40, 48)
VOXEL_NM = (40.0, 6.0, 6.0)
CHUNKS = (2, 16, 16)


class Volumes:
    def __init__(self, root: Path) -> None:
        self.url = f"file://{root}"
        self.store = Store(self.url)
        rng = np.random.default_rng(7)
        self.image = rng.integers(0, 256, SHAPE, dtype=np.uint8)
        prob = np.zeros(SHAPE, np.float32)
        prob[1:4, 5:15, 5:15] = 0.9  # matches the ground-truth object
        prob[2:5, 20:30, 25:40] = 0.7  # a false positive object
        prob[0, 35:37, 40:42] = 0.6  # a 4-voxel speck
        prob[5, 2:6, 40:44] = 0.3  # below the default threshold
        self.prob = prob
        gt = np.zeros(SHAPE, np.uint8)
        gt[1:4, 6:16, 5:15] = 1
        gt[4:6, 30:38, 2:10] = 2  # missed by the prediction
        self.gt = gt
        self.put("volumes/img.zarr", self.image)
        self.put("volumes/prob.zarr", prob, kind="probabilities")
        self.put("volumes/gt.zarr", gt, kind="labels")

    def put(self, path: str, data: np.ndarray, *, kind: str = "", complete: bool = True) -> None:
        attrs = {"kind": kind} if kind else {}
        arr = self.store.create_volume(
            path, data.shape, data.dtype, voxel_size_nm=VOXEL_NM, chunk_shape=CHUNKS,
            attributes=attrs,
        )  # fmt: skip
        arr[:] = data
        if complete:
            self.store.mark_complete(path)


@pytest.fixture
def vols(tmp_path: Path) -> Volumes:
    return Volumes(tmp_path / "store")


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def run_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = run("--output", "json", *args, env=env)
    assert result.exit_code == 0, result.output
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


# -- describe -----------------------------------------------------------------------
def test_describe_json_matches_numpy(vols: Volumes) -> None:
    r = run_json("describe", "volumes/img.zarr", "--bins", "8", "--store", vols.url)
    assert r["shape"] == list(SHAPE) and r["dtype"] == "uint8"
    assert r["voxel_size_nm"] == list(VOXEL_NM) and r["chunk_shape"] == list(CHUNKS)
    assert r["shard_shape"] is None and r["complete"] is True
    assert r["size_bytes"] == vols.image.nbytes
    img = vols.image.astype(np.float64)
    s = r["statistics"]
    assert (s["min"], s["max"], s["count"]) == (img.min(), img.max(), img.size)
    assert s["mean"] == pytest.approx(img.mean()) and s["std"] == pytest.approx(img.std())
    assert s["p50"] == pytest.approx(np.percentile(img, 50))
    assert s["p99"] == pytest.approx(np.percentile(img, 99))
    counts, edges = np.histogram(img, bins=8, range=(img.min(), img.max()))
    assert r["histogram"]["counts"] == counts.tolist()
    assert r["histogram"]["edges"] == pytest.approx(edges.tolist())


def test_describe_text(vols: Volumes) -> None:
    result = run("describe", "volumes/prob.zarr", "--bins", "4", "--store", vols.url)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "6 × 40 × 48" in text and "float32" in text and "40 × 6 × 6 nm" in text
    assert "kind=probabilities" in text
    assert f"max {float(vols.prob.max()):.6g}" in text
    assert "histogram    4 bins" in text
    # The bin holding zeros is the fullest and gets the longest bar.
    zeros = int((vols.prob == 0).sum())
    assert f"{zeros:>12,} {'█' * 40}" in text


def test_describe_uses_the_store_from_the_environment_and_store_urls(vols: Volumes) -> None:
    env = {"DEEP3M_STORE_URL": vols.url}
    assert run_json("describe", "volumes/gt.zarr", env=env)["statistics"]["max"] == 2
    # STORE//PATH names another store in the argument itself.
    r = run_json("describe", f"{vols.url}//volumes/gt.zarr", "--no-stats")
    assert r["url"] == f"{vols.url}/volumes/gt.zarr" and r["statistics"] is None


def test_describe_incomplete_volume_skips_statistics(vols: Volumes) -> None:
    vols.put("volumes/partial.zarr", vols.image, complete=False)
    r = run_json("describe", "volumes/partial.zarr", "--store", vols.url)
    assert r["complete"] is False and r["statistics"] is None and r["histogram"] is None


def test_missing_volume_exits_non_zero_naming_it(vols: Volumes) -> None:
    result = run("describe", "volumes/missing.zarr", "--store", vols.url)
    assert result.exit_code != 0
    assert "volumes/missing.zarr" in result.output and "does not exist" in result.output
    failed = run("--output", "json", "describe", "volumes/missing.zarr", "--store", vols.url)
    assert failed.exit_code != 0
    body = json.loads(failed.stdout)
    assert "volumes/missing.zarr" in body["error"] and body["field"] == "volume"


def test_missing_store_is_named_and_not_created(tmp_path: Path) -> None:
    absent = tmp_path / "no-such-store"
    result = run("describe", "volumes/x.zarr", "--store", str(absent))
    assert result.exit_code != 0 and str(absent) in result.output
    assert not absent.exists()
    bad = run("describe", "volumes/x.zarr", "--store", "ftp://host/store")
    assert bad.exit_code != 0 and "ftp" in bad.output


def test_absolute_volume_path_is_refused_with_a_hint(vols: Volumes) -> None:
    result = run("describe", "/etc/passwd", "--store", vols.url)
    assert result.exit_code != 0
    assert "/etc/passwd" in result.output and "STORE_URL//PATH" in result.output


# -- label --------------------------------------------------------------------------
def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, n = ndimage.label(mask)
    return labels, int(n)


def test_label_json_matches_scipy_and_writes_labels_and_tables(vols: Volumes) -> None:
    r = run_json("label", "volumes/prob.zarr", "--store", vols.url)
    expected, n = _components(vols.prob >= 0.5)
    assert r["object_count"] == n == 3
    assert r["labels"] == "volumes/prob.zarr/labels/segmentation"
    labels = np.asarray(vols.store.open_volume(r["labels"])[:])
    # Same partition as scipy, up to the order of the ids.
    pairs = {(int(a), int(b)) for a, b in zip(labels.ravel(), expected.ravel(), strict=True)}
    assert len(pairs) == n + 1 and len({a for a, _ in pairs}) == n + 1
    sizes = np.bincount(expected.ravel())[1:]
    assert r["foreground_voxels"] == int(sizes.sum())
    assert r["object_voxels"]["min"] == sizes.min() and r["object_voxels"]["max"] == sizes.max()
    keys = [u.removeprefix(vols.url + "/") for u in r["tables"]]
    table = vols.store.read_json(next(k for k in keys if k.endswith(".json")))
    assert table["object_count"] == n
    assert vols.store.exists(next(k for k in keys if k.endswith(".csv")))
    described = run_json("describe", "volumes/prob.zarr", "--no-stats", "--store", vols.url)
    assert described["labels"] == ["segmentation"]


def test_label_text_min_size_and_output(vols: Volumes) -> None:
    result = run(
        "label", "volumes/prob.zarr", "--min-size", "10", "--threshold", "0.25",
        "--output", "volumes/prob-labels.zarr", "--store", vols.url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    labels, _ = _components(vols.prob >= 0.25)
    big = int((np.bincount(labels.ravel())[1:] >= 10).sum())
    assert big == 3  # the speck is dropped, the faint square now counts
    assert f"objects      {big}" in result.stdout
    assert f"{vols.url}/volumes/prob-labels.zarr" in result.stdout
    written = np.asarray(vols.store.open_volume("volumes/prob-labels.zarr")[:])
    assert len(np.unique(written)) == big + 1


def test_label_refuses_to_overwrite_its_input(vols: Volumes) -> None:
    result = run("label", "volumes/prob.zarr", "--output", "volumes/prob.zarr", "--store", vols.url)
    assert result.exit_code != 0 and "--output" in result.output
    assert vols.store.open_volume("volumes/prob.zarr").dtype == np.float32


@pytest.mark.parametrize("threshold", ["1.5", "0", "-0.2", "nan"])
def test_label_bad_threshold_exits_non_zero_and_writes_nothing(
    vols: Volumes, threshold: str
) -> None:
    result = run("label", "volumes/prob.zarr", "--threshold", threshold, "--store", vols.url)
    assert result.exit_code != 0
    assert "threshold" in result.output
    assert not vols.store.exists("volumes/prob.zarr/labels/segmentation")


def test_label_watershed_splits_touching_objects(vols: Volumes) -> None:
    # Two touching balls joined by a thin neck: one component, two watershed objects.
    zz, yy, xx = np.ogrid[:8, :32, :48]
    balls = ((yy - 16) ** 2 + (xx - 12) ** 2 + (4 * (zz - 4)) ** 2 <= 81) | (
        (yy - 16) ** 2 + (xx - 30) ** 2 + (4 * (zz - 4)) ** 2 <= 81
    )
    neck = (np.abs(yy - 16) <= 1) & (xx >= 12) & (xx <= 30) & (np.abs(zz - 4) <= 0)
    vols.put("volumes/balls.zarr", (balls | neck).astype(np.float32), kind="probabilities")
    plain = run_json("label", "volumes/balls.zarr", "--store", vols.url)
    assert plain["object_count"] == _components(balls | neck)[1] == 1
    split = run_json(
        "label", "volumes/balls.zarr", "--watershed", "--name", "ws", "--store", vols.url
    )
    assert split["object_count"] == 2 and split["labels"].endswith("/labels/ws")


# -- evaluate -----------------------------------------------------------------------
def test_evaluate_json_matches_direct_counts(vols: Volumes) -> None:
    r = run_json("evaluate", "volumes/prob.zarr", "volumes/gt.zarr", "--store", vols.url)
    pred, gt = vols.prob >= 0.5, vols.gt > 0
    tp, fp = int((pred & gt).sum()), int((pred & ~gt).sum())
    fn, tn = int((~pred & gt).sum()), int((~pred & ~gt).sum())
    assert r["counts"] == {
        "true_positives": tp, "false_positives": fp,
        "false_negatives": fn, "true_negatives": tn,
    }  # fmt: skip
    assert r["precision"] == pytest.approx(tp / (tp + fp))
    assert r["recall"] == pytest.approx(tp / (tp + fn))
    assert r["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert r["jaccard"] == pytest.approx(tp / (tp + fp + fn))
    # Objects: a predicted object counts when its centroid lies in a ground-truth object.
    pred_labels, n_pred = _components(pred)
    centroids = ndimage.center_of_mass(pred, pred_labels, range(1, n_pred + 1))
    hits = sum(bool(gt[tuple(math.floor(c + 0.5) for c in cen)]) for cen in centroids)
    o = r["objects"]
    assert (o["predicted"], o["ground_truth"]) == (n_pred, _components(gt)[1])
    assert (o["true_positives"], o["false_positives"]) == (hits, n_pred - hits)
    assert o["f1"] == pytest.approx(2 * hits / (n_pred + _components(gt)[1]))


def test_evaluate_exclusion_zone_and_no_objects(vols: Volumes) -> None:
    r = run_json(
        "evaluate", "volumes/prob.zarr", "volumes/gt.zarr", "--exclusion-zone", "2",
        "--no-objects", "--store", vols.url,
    )  # fmt: skip
    whole = confusion_counts(vols.prob >= 0.5, vols.gt > 0, exclusion_zone=2)
    assert r["counts"]["true_positives"] == whole.true_positives
    assert r["counts"]["false_positives"] == whole.false_positives
    assert r["f1"] == pytest.approx(whole.f1) and r["objects"] is None
    assert r["exclusion_zone_voxels"] == 2


def test_evaluate_text(vols: Volumes) -> None:
    result = run("evaluate", "volumes/prob.zarr", "volumes/gt.zarr", "--store", vols.url)
    assert result.exit_code == 0, result.output
    whole = confusion_counts(vols.prob >= 0.5, vols.gt > 0)
    for value in (whole.precision, whole.recall, whole.f1, whole.jaccard):
        assert f"{value:.4f}" in result.stdout
    assert "objects (centroid matching)" in result.stdout


def test_evaluate_missing_ground_truth_and_bad_threshold(vols: Volumes) -> None:
    missing = run("evaluate", "volumes/prob.zarr", "volumes/nope.zarr", "--store", vols.url)
    assert missing.exit_code != 0
    assert "volumes/nope.zarr" in missing.output and "ground_truth" in missing.output
    bad = run(
        "evaluate", "volumes/prob.zarr", "volumes/gt.zarr", "--threshold", "2", "--store", vols.url
    )
    assert bad.exit_code != 0 and "threshold" in bad.output and "2" in bad.output


def test_evaluate_min_size_and_error_overlays(vols: Volumes, tmp_path: Path) -> None:
    folder = tmp_path / "errors"
    r = run_json(
        "evaluate", "volumes/prob.zarr", "volumes/gt.zarr", "--min-size", "5",
        "--overlays", str(folder), "--image", "volumes/img.zarr", "--slices", "0,2",
        "--store", vols.url,
    )  # fmt: skip
    # The 4-voxel speck is no object at --min-size 5; without it, one more.
    _, n_pred = _components(vols.prob >= 0.5)
    assert r["min_size_voxels"] == 5 and r["objects"]["predicted"] == n_pred - 1
    assert [Path(f).name for f in r["overlays"]] == [p.name for p in sorted(folder.iterdir())]
    assert len(r["overlays"]) == 2
    page = np.asarray(Image.open(r["overlays"][1]).convert("RGB"))
    pred, gt = vols.prob[2] >= 0.5, vols.gt[2] > 0
    body = page[: SHAPE[1], : SHAPE[2]]
    # Pure-ish green over true positives, red over false positives, blue over misses.
    tp, fp = body[pred & gt], body[pred & ~gt]
    assert (tp[:, 1] > tp[:, 0]).all() and (tp[:, 1] > tp[:, 2]).all()
    assert (fp[:, 0] > fp[:, 1]).all() and (fp[:, 0] > fp[:, 2]).all()
    # The image shows through where nothing is predicted or true.
    neither = ~pred & ~gt
    assert len(np.unique(body[neither][:, 0])) > 10


def test_evaluate_text_lists_overlays_and_rejects_image_alone(
    vols: Volumes, tmp_path: Path
) -> None:
    folder = tmp_path / "errs"
    result = run(
        "evaluate", "volumes/prob.zarr", "volumes/gt.zarr", "--overlays", str(folder),
        "--store", vols.url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    written = sorted(folder.iterdir())
    assert len(written) == SHAPE[0]
    assert f"error overlays ({SHAPE[0]})" in result.stdout
    assert all(p.name in result.stdout for p in written)
    bad = run(
        "evaluate", "volumes/prob.zarr", "volumes/gt.zarr", "--image", "volumes/img.zarr",
        "--store", vols.url,
    )  # fmt: skip
    assert bad.exit_code != 0 and "--overlays" in bad.output


# -- pyramid ------------------------------------------------------------------------
def test_pyramid_json_levels_match_block_means(vols: Volumes) -> None:
    r = run_json("pyramid", "volumes/img.zarr", "--levels", "2", "--store", vols.url)
    assert [lv["path"] for lv in r["levels"]] == ["0", "1", "2"]
    # Anisotropic 40 × 6 × 6 nm data keeps every slice; y and x halve per level.
    assert [lv["shape"] for lv in r["levels"]] == [[6, 40, 48], [6, 20, 24], [6, 10, 12]]
    assert r["levels"][2]["voxel_size_nm"] == [40.0, 24.0, 24.0]
    level1 = np.asarray(vols.store.open_volume("volumes/img.zarr", "1")[:])
    expected = vols.image.astype(np.float64).reshape(6, 20, 2, 24, 2).mean(axis=(2, 4))
    np.testing.assert_array_equal(level1, np.rint(expected).astype(np.uint8))
    described = run_json("describe", "volumes/img.zarr", "--no-stats", "--store", vols.url)
    assert described["levels"] == ["0", "1", "2"]


def test_pyramid_text_and_errors(vols: Volumes) -> None:
    result = run("pyramid", "volumes/gt.zarr", "--levels", "2", "--store", vols.url)
    assert result.exit_code == 0, result.output
    assert "6 × 20 × 24" in result.stdout and "40 × 24 × 24" in result.stdout
    # Label volumes take the most frequent id per window, so ids stay ids.
    assert set(np.unique(vols.store.open_volume("volumes/gt.zarr", "2")[:])) <= {0, 1, 2}
    too_deep = run("pyramid", "volumes/gt.zarr", "--levels", "9", "--store", vols.url)
    assert too_deep.exit_code != 0 and "levels" in too_deep.output
    vols.put("volumes/partial.zarr", vols.image, complete=False)
    partial = run("pyramid", "volumes/partial.zarr", "--store", vols.url)
    assert partial.exit_code != 0 and "incomplete" in partial.output
    assert not vols.store.exists("volumes/partial.zarr/1")


# -- export -------------------------------------------------------------------------
def test_export_tiff_and_png_slices(vols: Volumes, tmp_path: Path) -> None:
    r = run_json(
        "export", "volumes/img.zarr", str(tmp_path / "out" / "img.tif"), "--slices", "1,3-4",
        "--store", vols.url,
    )  # fmt: skip
    assert r["files"] == [str(tmp_path / "out" / "img.tif")] and r["slices"] == [1, 3, 4]
    np.testing.assert_array_equal(tifffile.imread(r["files"][0]), vols.image[[1, 3, 4]])
    png = run_json(
        "export", "volumes/prob.zarr", str(tmp_path / "pages"), "--format", "png",
        "--store", vols.url,
    )  # fmt: skip
    assert len(png["files"]) == SHAPE[0]
    page = np.asarray(Image.open(png["files"][2]))
    # Probabilities become 8-bit 0..255 pages.
    np.testing.assert_array_equal(page, np.rint(vols.prob[2] * 255).astype(np.uint8))


def test_export_overlay(vols: Volumes, tmp_path: Path) -> None:
    result = run(
        "export", "volumes/prob.zarr", str(tmp_path / "ov"), "--format", "overlay",
        "--image", "volumes/img.zarr", "--slices", "2", "--store", vols.url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote 1 file (overlay)" in result.stdout
    (only,) = sorted((tmp_path / "ov").glob("*.png"))
    rgb = np.asarray(Image.open(only))
    assert rgb.shape == (*SHAPE[1:], 3)
    # Background keeps the image's grey; foreground is tinted red.
    np.testing.assert_array_equal(rgb[0, 0], [vols.image[2, 0, 0]] * 3)
    fg = rgb[10, 10].astype(int)
    assert fg[0] > fg[1] and fg[1] == fg[2]


def test_export_errors_name_the_option(vols: Volumes, tmp_path: Path) -> None:
    dest = str(tmp_path / "x")
    no_image = run("export", "volumes/prob.zarr", dest, "--format", "overlay", "--store", vols.url)
    assert no_image.exit_code != 0 and "--image" in no_image.output
    backwards = run("export", "volumes/img.zarr", dest, "--slices", "4-1", "--store", vols.url)
    assert backwards.exit_code != 0 and "4-1" in backwards.output
    outside = run("export", "volumes/img.zarr", dest, "--slices", "99", "--store", vols.url)
    assert outside.exit_code != 0 and "slice 99" in outside.output
    unknown = run("export", "volumes/img.zarr", dest, "--format", "jpeg", "--store", vols.url)
    assert unknown.exit_code != 0 and "jpeg" in unknown.output
    assert not (tmp_path / "x").exists()


def test_export_never_overwrites_without_the_option(vols: Volumes, tmp_path: Path) -> None:
    tif = tmp_path / "img.tif"
    tif.write_bytes(b"someone's file")
    refused = run("export", "volumes/img.zarr", str(tif), "--store", vols.url)
    assert refused.exit_code != 0 and "already exists" in refused.output
    assert "--overwrite" in refused.output and tif.read_bytes() == b"someone's file"
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "notes.txt").write_text("keep")
    png = ["--format", "png", "--store", vols.url]
    assert run("export", "volumes/prob.zarr", str(pages), *png).exit_code != 0
    assert sorted(p.name for p in pages.iterdir()) == ["notes.txt"]
    # An empty folder holds nothing to lose; --overwrite replaces what is there.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(run_json("export", "volumes/prob.zarr", str(empty), *png)["files"]) == SHAPE[0]
    replaced = run_json("export", "volumes/img.zarr", str(tif), "--overwrite", "--store", vols.url)
    assert replaced["files"] == [str(tif)]
    np.testing.assert_array_equal(tifffile.imread(tif), vols.image)


# -- models -------------------------------------------------------------------------
def test_models_lists_cards(vols: Volumes) -> None:
    assert run_json("models", "--store", vols.url)["models"] == []
    save_card(
        vols.store,
        ModelCard(
            id="mito",
            members=(
                MemberCard(name="1fm", frames=1, weights="1fm/weights.safetensors",
                           iterations=300, metrics={"f1": 0.8}),
                MemberCard(name="3fm", frames=3, iterations=300),
            ),
            iterations=600, metrics={"f1": 0.875, "jaccard": 0.7},
        ),
    )  # fmt: skip
    save_card(
        vols.store,
        ModelCard(
            id="vesicles", architecture="resunet2d", members=(MemberCard(name="1fm", frames=1),)
        ),
    )
    vols.store.write_bytes("models/broken/model.json", b"{not json")
    r = run_json("models", "--store", vols.url)
    by_id = {m["id"]: m for m in r["models"]}
    assert set(by_id) == {"mito", "vesicles"}
    mito = by_id["mito"]
    assert mito["architecture"] == "deepem3d" and mito["iterations"] == 600
    assert [m["name"] for m in mito["members"]] == ["1fm", "3fm"]
    assert [m["trained"] for m in mito["members"]] == [True, False]
    assert mito["metrics"] == {"f1": 0.875, "jaccard": 0.7}
    assert by_id["vesicles"]["architecture"] == "resunet2d"
    assert [b["id"] for b in r["invalid"]] == ["broken"]
    text = run("models", "--store", vols.url)
    assert text.exit_code == 0
    assert "mito" in text.stdout and "resunet2d" in text.stdout and "f1 0.875" in text.stdout
    assert "broken" in text.output


def test_models_shows_the_adaptation_of_an_adapted_model(vols: Volumes) -> None:
    save_card(
        vols.store,
        ModelCard(
            id="mito-sstem",
            members=(MemberCard(name="1fm", frames=1, weights="1fm/w.safetensors"),),
            adaptation={
                "method": "multitask", "target": "volumes/sstem.zarr", "select_by": "solidity",
                "match_histogram_at_predict": True, "training_histogram": {"counts": [1]},
                "members": {"1fm": {"chosen_checkpoint": "segmentation-000400"}},
                "fallback": None,
            },
        ),
    )  # fmt: skip
    by_id = {m["id"]: m for m in run_json("models", "--store", vols.url)["models"]}
    assert by_id["mito-sstem"]["adaptation"] == {
        "method": "multitask",
        "target": "volumes/sstem.zarr",
        "select_by": "solidity",
        "match_histogram_at_predict": True,
        "chosen": {"1fm": "segmentation-000400"},
        "fallback": None,
    }
    assert all(m["adaptation"] is None for i, m in by_id.items() if i != "mito-sstem")
    text = run("models", "--store", vols.url)
    assert text.exit_code == 0
    # The table wraps narrow cells: whole words only.
    assert all(w in text.stdout for w in ("adaptation", "multitask", "solidity", "matched"))


# -- doctor -------------------------------------------------------------------------
@pytest.fixture
def serving() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0).wait()


def test_doctor_checks_servers_and_store(serving: str, tmp_path: Path) -> None:
    env = {"DEEP3M_STORE_URL": str(tmp_path / "doctor-store")}
    r = run_json("doctor", "--address", serving, "--store", env=env)
    assert r["ok"] is True
    assert [(c["check"], c["target"], c["ok"]) for c in r["checks"]] == [
        ("health", serving, True),
        ("store", str(tmp_path / "doctor-store"), True),
    ]
    text = run("doctor", "--address", serving)
    assert text.exit_code == 0 and f"ok   health {serving} SERVING" in text.stdout
    # Without --address the scheduler is checked, from DEEP3M_SCHEDULER_ADDRESS.
    default = run_json("doctor", env={"DEEP3M_SCHEDULER_ADDRESS": serving})
    assert [c["target"] for c in default["checks"]] == [serving]


def test_doctor_unreachable_server_fails_naming_it(serving: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    result = run("--timeout", "2", "doctor", "--address", serving, "--address", closed)
    assert result.exit_code != 0
    assert f"FAIL health {closed}" in result.stdout and f"ok   health {serving}" in result.stdout


# -- rm -------------------------------------------------------------------------------
def test_rm_removes_a_volume_and_nothing_else(vols: Volumes) -> None:
    vols.store.write_json("jobs/j1/job.json", {"id": "j1"})
    report = run_json("rm", "volumes/prob.zarr", "--store", vols.url)
    assert report["removed"] == vols.store.key_url("volumes/prob.zarr")
    assert not vols.store.exists("volumes/prob.zarr/zarr.json")
    assert vols.store.exists("volumes/img.zarr/zarr.json")  # its neighbour stays
    # Gone means gone: a second rm names what is missing.
    again = run("rm", "volumes/prob.zarr", "--store", vols.url)
    assert again.exit_code == 1 and "no volume" in again.output
    # The store's own documents are not volumes.
    reserved = run("rm", "jobs/j1", "--store", vols.url, "--force")
    assert reserved.exit_code == 1 and "reserved" in reserved.output
    assert vols.store.exists("jobs/j1/job.json")
    escape = run("rm", "../outside", "--store", vols.url)
    assert escape.exit_code != 0 and vols.store.exists("volumes/img.zarr/zarr.json")


def test_rm_of_a_failed_ingest_lets_the_retry_start_afresh(vols: Volumes) -> None:
    vols.put("volumes/partial.zarr", vols.image, complete=False)
    assert run("rm", "volumes/partial.zarr", "--store", vols.url).exit_code == 0
    vols.put("volumes/partial.zarr", vols.image)  # the retry writes a fresh volume
    assert vols.store.exists("volumes/partial.zarr/zarr.json")
    # A plain folder needs --force.
    vols.store.write_bytes("scratch/notes.txt", b"x")
    assert run("rm", "scratch", "--store", vols.url).exit_code == 1
    assert run("rm", "scratch", "--store", vols.url, "--force").exit_code == 0
    assert not vols.store.exists("scratch/notes.txt")


def test_label_and_evaluate_default_to_the_threshold_chosen_on_validation(vols: Volumes) -> None:
    save_card(
        vols.store, ModelCard(id="mito", members=(MemberCard(name="1fm", frames=1),), threshold=0.8)
    )
    arr = vols.store.create_volume(
        "volumes/pred.zarr", SHAPE, np.float32, voxel_size_nm=VOXEL_NM, chunk_shape=CHUNKS,
        attributes={"kind": "probabilities", "model": "mito"},
    )  # fmt: skip
    arr[:] = vols.prob
    vols.store.mark_complete("volumes/pred.zarr")
    chosen = run_json("evaluate", "volumes/pred.zarr", "volumes/gt.zarr", "--store", vols.url)
    plain = run_json("evaluate", "volumes/prob.zarr", "volumes/gt.zarr", "--store", vols.url)
    assert (chosen["threshold"], plain["threshold"]) == (0.8, 0.5)
    # At 0.8 the 0.7 false-positive object and the 0.6 speck are background.
    assert chosen["counts"]["false_positives"] < plain["counts"]["false_positives"]
    given = run_json(
        "evaluate",
        "volumes/pred.zarr",
        "volumes/gt.zarr",
        "--threshold",
        "0.5",
        "--store",
        vols.url,
    )
    assert given["threshold"] == 0.5
    labelled = run_json("label", "volumes/pred.zarr", "--store", vols.url)
    assert labelled["threshold"] == 0.8 and labelled["object_count"] == 1
