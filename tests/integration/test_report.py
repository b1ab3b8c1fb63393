"""``deep3m report JOB`` on real SBEM slices: the page's content checked with an HTML
parser against direct computations, and the page rendered in a headless Chromium."""

from __future__ import annotations

import base64
import csv
import io
import json
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from deep3m.client.cli import app
from deep3m.core.metrics import confusion_counts
from deep3m.core.store import Store
from deep3m.models.card import MemberCard, ModelCard, save_card
from deep3m.scheduler.kinds.base import VolumeFacts
from deep3m.scheduler.persistence import JobRecord, JobStore
from deep3m.testing.browser import dump_dom, find_chromium, screenshot
from deep3m.v1 import common_pb2
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("isolated")

SLICES = 5
CROP = 320
VOXEL_NM = (40.0, 5.9, 5.9)
JOB = "predict-0001"


class Page(HTMLParser):
    """Tables (rows of cell texts), images and links of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.headings: list[str] = []
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self._heading = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self._table = self.tables.setdefault(a.get("class") or f"t{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a)
        elif tag == "a":
            self.links.append(a.get("href", ""))
        elif tag in ("h1", "h2", "h3"):
            self._heading = True
            self.headings.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None and self._table is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag in ("h1", "h2", "h3"):
            self._heading = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._heading:
            self.headings[-1] += data


@pytest.fixture
def job(data_dir: Path, tmp_path: Path) -> tuple[Store, np.ndarray, np.ndarray]:
    """A finished predict job's documents, as the scheduler writes them, over real slices:
    the probabilities are the mitochondria labels blurred and shifted (so the score is
    neither 0 nor 1), with a model card."""
    folder = data_dir / "cdeep3m-mito" / "validation"
    image = np.stack(
        [
            np.asarray(Image.open(p))[:CROP, :CROP]
            for p in sorted((folder / "images").glob("*.png"))[:SLICES]
        ]
    )
    mask = (
        np.stack(
            [
                np.asarray(Image.open(p))[:CROP, :CROP]
                for p in sorted((folder / "labels").glob("*.png"))[:SLICES]
            ]
        )
        > 0
    )
    prob = ndimage.gaussian_filter(np.roll(mask, 6, axis=2).astype(np.float32), (0, 3, 3))
    store = Store(f"file://{tmp_path}/store")
    for path, data, kind in (
        ("volumes/val.zarr", image, ""),
        ("volumes/val-labels.zarr", mask.astype(np.uint8), "mask"),
        ("volumes/val-prob.zarr", prob, "probabilities"),
    ):
        arr = store.create_volume(
            path, data.shape, data.dtype, voxel_size_nm=VOXEL_NM, chunk_shape=(2, 128, 128),
            attributes={"kind": kind} if kind else {},
        )  # fmt: skip
        arr[:] = data
        store.mark_complete(path)
    save_card(
        store,
        ModelCard(
            id="mito", members=(MemberCard(name="1fm", frames=1, iterations=400,
                                           metrics={"f1": 0.81}),),
            iterations=400, metrics={"f1": 0.81}, voxel_size_nm=VOXEL_NM,
        ),
    )  # fmt: skip
    spec = common_pb2.JobSpec(
        predict=common_pb2.PredictSpec(
            input=common_pb2.VolumeRef(path="volumes/val.zarr"), model="mito",
            output=common_pb2.VolumeRef(path="volumes/val-prob.zarr"), tta_level=10,
        )
    )  # fmt: skip

    def facts(path: str) -> VolumeFacts:
        info = store.volume_info(path)
        return VolumeFacts(store.url, path, "", info.shape, info.dtype, info.chunk_shape,
                           info.voxel_size_nm)  # fmt: skip

    jobs = JobStore(store)
    jobs.save_job(
        JobRecord(JOB, "predict", spec, spec, time.time(), 3, {"output": "volumes/val-prob.zarr"},
                  {"input": facts("volumes/val.zarr"), "output": facts("volumes/val-prob.zarr")})
    )  # fmt: skip
    jobs.save_result(
        JOB, {"state": "SUCCEEDED", "message": "", "finished_unix_s": time.time(), "errors": [],
              "outputs": {}, "metrics": {}, "stages": {"predict": {
                  "total": 4, "pending": 0, "leased": 0, "done": 4, "quarantined": 0}}},
    )  # fmt: skip
    return store, prob, mask


def test_report_page_holds_the_job_model_accuracy_objects_and_figures(
    job: tuple[Store, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    store, prob, mask = job
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        ["--output", "json", "report", JOB, "--to", str(out), "--ground-truth",
         "volumes/val-labels.zarr", "--min-size", "20", "--store", store.url],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary: dict[str, Any] = json.loads(result.stdout)
    page = Page()
    page.feed((out / "index.html").read_text())
    assert {"Job", "Model", "Accuracy", "Objects", "Density and sizes", "Viewer"} <= set(
        page.headings
    )
    job_rows = dict((r[0], r[1]) for r in page.tables["job"][1:])
    assert job_rows["state"] == "SUCCEEDED" and job_rows["kind"] == "predict"
    assert [r[1] for r in page.tables["volumes"][1:]] == [
        "volumes/val.zarr",
        "volumes/val-prob.zarr",
    ]
    model_rows = dict((r[0], r[1]) for r in page.tables["model"][1:])
    assert model_rows["architecture"] == "deepem3d" and model_rows["metric f1"] == "0.81"
    # Accuracy as a whole-volume computation gives it.
    whole = confusion_counts(prob >= 0.5, mask)
    voxels = page.tables["accuracy"][1]
    assert voxels[0] == "voxels"
    assert [float(v) for v in voxels[1:]] == pytest.approx(
        [whole.precision, whole.recall, whole.f1, whole.jaccard], rel=1e-3
    )
    assert 0.2 < whole.f1 < 0.95  # the shifted labels are neither perfect nor useless
    assert summary["accuracy"]["f1"] == pytest.approx(whole.f1)
    # Objects: scipy's components of the thresholded map, without those below 20 voxels.
    labels, _ = ndimage.label(prob >= 0.5)
    sizes = np.bincount(labels.ravel())[1:]
    assert summary["objects"]["count"] == int((sizes >= 20).sum()) > 0
    shown = page.tables["objects"][1:]
    assert int(shown[0][1]) == int(sizes.max())
    with (out / "objects.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["objects"]["count"]
    assert sorted(int(r["volume_voxels"]) for r in rows) == sorted(sizes[sizes >= 20].tolist())
    # Figures: embedded (self-contained) and the same bytes beside the page.
    files = {img.get("data-file", ""): img["src"] for img in page.images}
    assert {"density.png", "sizes.png"} <= set(files)
    overlays = sorted(f for f in files if f.startswith("errors/"))
    assert len(overlays) == 3 and overlays == summary["accuracy"]["overlays"]
    for name, src in files.items():
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1])
        assert raw == (out / name).read_bytes()
        assert Image.open(io.BytesIO(raw)).size[0] > 100
    assert not [src for src in files.values() if src.startswith(("http:", "https:", "file:"))]
    assert "objects.csv" in page.links


def test_report_errors_name_the_job_and_the_volume(
    job: tuple[Store, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    store, _, _ = job
    missing = CliRunner().invoke(app, ["report", "nope", "--store", store.url])
    assert missing.exit_code != 0 and "nope" in missing.output
    bad = CliRunner().invoke(
        app, ["report", JOB, "--to", str(tmp_path / "r"), "--ground-truth", "volumes/x.zarr",
              "--store", store.url],
    )  # fmt: skip
    assert bad.exit_code != 0 and "volumes/x.zarr" in bad.output
    assert not (tmp_path / "r" / "index.html").exists()


@pytest.mark.slow
def test_report_renders_in_chromium(
    job: tuple[Store, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    if find_chromium() is None:
        pytest.skip("chromium not found (apt-get install chromium; .ci/run installs it)")
    store, _, _ = job
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["report", JOB, "--to", str(out), "--ground-truth", "volumes/val-labels.zarr",
              "--store", store.url],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    shot = screenshot((out / "index.html").as_uri(), tmp_path / "report.png", height=1600,
                      budget_ms=3000)  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    # Text, tables and the embedded figures: far more than a blank or broken page.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200
    assert (pixels < 128).any(axis=2).mean() > 0.01
    # The browser parsed the page into the same tables and images the file holds.
    rendered = Page()
    rendered.feed(dump_dom((out / "index.html").as_uri()))
    assert {"job", "model", "accuracy", "objects"} <= set(rendered.tables)
    assert len(rendered.images) == 5  # three error overlays, density, sizes
