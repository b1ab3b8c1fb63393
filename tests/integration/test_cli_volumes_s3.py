"""The volume commands of ``deep3m`` on a real S3 store (SeaweedFS on loopback), with the
credentials and endpoint taken from the ``DEEP3M_S3_*`` settings as a user would give them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from deep3m.client.cli import app
from deep3m.core.store import Store
from deep3m.testing.seaweed import SeaweedServer
from scipy import ndimage
from typer.testing import CliRunner

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("isolated")]


def test_describe_label_export_on_s3(
    s3_server: SeaweedServer, s3_prefix: str, tmp_path: Path
) -> None:
    store = Store(s3_prefix, s3_server.storage_options)
    prob = np.zeros((4, 32, 32), np.float32)
    prob[1:3, 4:12, 4:12] = 0.8
    prob[0:2, 20:28, 18:30] = 0.9
    arr = store.create_volume(
        "volumes/p.zarr", prob.shape, "float32", chunk_shape=(2, 16, 16),
        attributes={"kind": "probabilities"},
    )  # fmt: skip
    arr[:] = prob
    store.mark_complete("volumes/p.zarr")
    env = {**s3_server.settings_env(), "DEEP3M_STORE_URL": s3_prefix}
    runner = CliRunner()

    def run(*args: str) -> dict[str, object]:
        result = runner.invoke(app, ["--output", "json", *args], env=env)
        assert result.exit_code == 0, result.output
        parsed: dict[str, object] = json.loads(result.stdout)
        return parsed

    described = run("describe", "volumes/p.zarr", "--bins", "2")
    assert described["url"] == f"{s3_prefix}/volumes/p.zarr"
    assert described["statistics"]["max"] == pytest.approx(0.9)  # type: ignore[index]
    labelled = run("label", "volumes/p.zarr")
    assert labelled["object_count"] == ndimage.label(prob >= 0.5)[1] == 2
    assert store.open_volume("volumes/p.zarr/labels/segmentation").dtype == np.uint32
    exported = run("export", "volumes/p.zarr", str(tmp_path / "p.tif"))
    page = tifffile.imread(exported["files"][0])  # type: ignore[index]
    np.testing.assert_array_equal(page, np.rint(prob * 255).astype(np.uint8))
    missing = runner.invoke(app, ["describe", "volumes/absent.zarr"], env=env)
    assert missing.exit_code != 0 and f"{s3_prefix}/volumes/absent.zarr" in missing.output
