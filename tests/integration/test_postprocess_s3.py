"""Postprocessing on a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from deep3m.core.store import Store
from deep3m.postprocess.evaluate import EvaluateSpec, evaluate_volumes
from deep3m.postprocess.export import export_volume
from deep3m.postprocess.labels import LabelSpec, label_volume
from deep3m.postprocess.pyramid import build_pyramid
from deep3m.testing.seaweed import SeaweedServer
from scipy import ndimage

pytestmark = pytest.mark.s3


def test_label_pyramid_evaluate_export_on_s3(s3_server: SeaweedServer, s3_prefix: str) -> None:
    store = Store(s3_prefix, s3_server.storage_options)
    field = ndimage.gaussian_filter(np.random.default_rng(0).random((8, 64, 64)), 2.0)
    prob = ((field - field.min()) / (field.max() - field.min())).astype(np.float32)
    arr = store.create_volume(
        "volumes/p.zarr",
        prob.shape,
        "float32",
        chunk_shape=(4, 32, 32),
        attributes={"kind": "probabilities"},
    )
    arr[:] = prob
    store.mark_complete("volumes/p.zarr")

    out = label_volume(store, "volumes/p.zarr", LabelSpec(threshold=0.6), max_workers=2)
    want, n = ndimage.label(prob >= 0.6)
    got = store.open_volume(out.labels_path)[:]
    assert out.object_count == n > 1
    assert ((got > 0) == (want > 0)).all()
    assert store.read_json("volumes/p.segmentation.objects.json")["object_count"] == n

    assert build_pyramid(store, out.labels_path, levels=1) == ["0", "1"]
    assert store.volume_info(out.labels_path, "1").shape == (4, 32, 32)  # isotropic voxels

    result = evaluate_volumes(
        (store, "volumes/p.zarr"), (store, out.labels_path), EvaluateSpec(threshold=0.6)
    )
    assert result.voxels.f1 == 1.0
    assert result.objects is not None and result.objects.f1 == 1.0

    files = export_volume(
        store,
        out.labels_path,
        f"{s3_prefix}/exports/seg.tif",
        "tiff",
        storage_options=s3_server.storage_options,
    )
    assert files == [f"{s3_prefix}/exports/seg.tif"]
    exported = tifffile.imread(io.BytesIO(store.read_bytes("exports/seg.tif")))
    np.testing.assert_array_equal(exported, got)
