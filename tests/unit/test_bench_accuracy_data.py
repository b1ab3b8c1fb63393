"""The accuracy benchmark's data sets: splits and foreground rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.bench_accuracy import ISBI, _stacks

pytestmark = pytest.mark.skipif(not ISBI.is_dir(), reason="needs ../shared/data/isbi2012")


@pytest.mark.parametrize(
    ("dataset", "low", "high"),
    # ISBI membranes cover about a fifth of the sections, mitochondria a few per cent:
    # an inverted rule (cell interior as foreground) lands far outside these bounds.
    [("isbi2012-membranes", 0.1, 0.4), ("isbi2012-mito", 0.005, 0.2)],
)
def test_isbi_splits_and_foreground(dataset: str, low: float, high: float) -> None:
    stacks, description = _stacks(dataset)
    assert stacks["images"].shape == (20, 512, 512)
    assert stacks["validation_images"].shape == (10, 512, 512)
    assert stacks["labels"].shape == stacks["images"].shape
    for key in ("labels", "validation_labels"):
        assert set(np.unique(stacks[key])) == {0, 1}
        assert low < float(stacks[key].mean()) < high
    assert str(Path("isbi2012")) in description


def test_unknown_data_set_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown data set"):
        _stacks("lucchi")


@pytest.mark.parametrize("name", ["monai", "monai-bn", "resunet2d"])
def test_peer_networks_map_a_slice_to_two_class_logits(name: str) -> None:
    import torch

    from bench.bench_accuracy import peer_network

    net = peer_network(name).eval()
    norms = {type(m).__name__ for m in net.modules() if "Norm" in type(m).__name__}
    # Only the peer itself normalises per instance; both diagnostic rows use BatchNorm.
    assert ("InstanceNorm2d" in norms) == (name == "monai")
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 64, 64)).shape == (1, 2, 64, 64)


def test_unknown_peer_network_is_refused() -> None:
    from bench.bench_accuracy import peer_network

    with pytest.raises(ValueError, match="unknown peer network"):
        peer_network("vnet")
