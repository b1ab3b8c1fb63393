"""Domain adaptation through the real scheduler and training role (loopback gRPC,
ephemeral ports, a file store): every method from a submitted job, the model
card's adaptation record, bad input refused at submission naming the field, the
no-foreground fallback, and prediction-time histogram matching.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import zarr
from deep3m.adaptation.histogram import (
    apply_lut,
    lut_from_counts,
    prediction_reference,
    reference_histogram,
    volume_counts,
)
from deep3m.client.cli import app
from deep3m.client.client import Deep3mClient
from deep3m.core.augmentation import IDENTITY_LEVEL
from deep3m.core.errors import InvalidArgumentError
from deep3m.core.geometry import Box
from deep3m.core.store import Store
from deep3m.inference.setup import PredictorSetup
from deep3m.launcher.local import free_port
from deep3m.models.card import card_key, load_card, save_card
from deep3m.runtime.server import RunningServer, create_server
from deep3m.runtime.settings import Settings
from deep3m.testing.training import stage_synthetic, synthetic_stack
from deep3m.training.demo_data import write_volume
from deep3m.v1 import common_pb2, training_pb2, training_pb2_grpc
from typer.testing import CliRunner

TARGET = "volumes/target.zarr"
WIDE = "volumes/target-16bit.zarr"
ZEROS = "volumes/target-zeros.zarr"
TINY: dict[str, Any] = {
    "recipe": "cdeep3m",
    "width": 0.0625,
    "iterations": 4,
    "batch_size": 2,
    "patch_shape": [32, 32],
    "learning_rate": 1e-3,
    "seed": 1,
    "adaptation_iterations": 2,
    "adaptation_checkpoints": 2,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    store = Store(f"file://{tmp_path_factory.mktemp('adapt') / 'store'}")
    images, _ = synthetic_stack(6, 64, seed=5)
    # Another "microscope": inverted contrast and a narrower grey range.
    write_volume(store, TARGET, (255 - images // 2).astype(np.uint8))
    return store


@pytest.fixture(scope="module")
def paths(store: Store) -> dict[str, str]:
    return stage_synthetic(store, validation=False)


@pytest.fixture(scope="module")
def settings(store: Store) -> Settings:
    return Settings(
        store_url=store.url,
        device="cpu",
        metrics_port=0,
        scheduler_address=f"127.0.0.1:{free_port()}",
        poll_interval_seconds=0.05,
    )


@pytest.fixture(scope="module")
def training_role(settings: Settings) -> Iterator[RunningServer]:
    """The scheduler and the training role (its worker and its Training service)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    port = int(settings.scheduler_address.rsplit(":", 1)[1])
    scheduler = create_server("scheduler", settings, port=port, host="127.0.0.1")
    role = create_server("training", settings, port=0, host="127.0.0.1")
    try:
        yield role
    finally:
        role.stop(grace=5.0)
        scheduler.stop(grace=1.0)
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def client(settings: Settings, training_role: RunningServer) -> Iterator[Deep3mClient]:
    with Deep3mClient(settings.scheduler_address) as c:
        yield c


def train(client: Deep3mClient, paths: dict[str, str], model: str, **extra: Any) -> Any:
    values = {**TINY, **extra}
    job = client.train(images=paths["images"], labels=paths["labels"], model=model, **values)
    for _ in client.watch(job.id, timeout_s=120):
        pass
    return client.get(job.id)


@pytest.mark.parametrize(
    ("method", "architecture", "members", "network"),
    [
        ("none", "resunet2d", ["1fm"], "resunet2d"),
        ("histogram", "deepem3d", ["1fm", "3fm"], "deepem3d"),
        ("histogram-online", "resunet2d", ["1fm"], "resunet2d"),
        ("translation", "resunet2d", ["1fm"], "resunet2d"),
        ("ssl", "deepem3d", ["1fm"], "deepem3d"),
        ("multitask", "resunet2d", [], "ynet"),
    ],
)
def test_each_method_runs_end_to_end_from_a_submitted_job(
    client: Deep3mClient,
    store: Store,
    paths: dict[str, str],
    method: str,
    architecture: str,
    members: list[str],
    network: str,
) -> None:
    model = f"adapted-{method}"
    final = train(
        client,
        paths,
        model,
        adapt_to=TARGET,
        adaptation=method,
        select_by="solidity",
        architecture=architecture,
        members=members,
    )
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, list(final.errors)
    card = load_card(store, model)
    assert card.architecture == network
    assert card.member_names == tuple(members or ["1fm"])  # multitask: the 2D Y-Net only
    record = card.adaptation
    assert record["method"] == method and record["select_by"] == "solidity"
    assert record["target"].endswith(TARGET)
    # Pooled from the counts recorded when the target was written: as from its images.
    target_images = np.asarray(store.open_volume(TARGET)[:])
    assert record["target_histogram"] == reference_histogram(target_images).to_dict()
    assert record["reference_morphology"]["regions"] > 0
    assert card.training["adaptation"] == method
    for member in card.member_names:
        doc = store.read_json(f"models/{model}/{member}/metrics.json")
        candidates = doc["adaptation_metrics"]["candidates"]
        assert [c["iteration"] for c in candidates] == [2, 4]
        assert all({"target_solidity", "target_regions", "source_validation_iou"} <= set(c)
                   for c in candidates)  # fmt: skip
        chosen = record["members"][member]
        assert chosen["chosen_checkpoint"] in {c["name"] for c in candidates}
        assert chosen["choice"]["criterion"] == "solidity"
        assert set(chosen["choice"]["distances"]) == {c["name"] for c in candidates}


def _add_array(store: Store, path: str, name: str, shape: tuple[int, ...]) -> None:
    """An extra array in a volume's group, as another tool might write it."""
    group = zarr.open_group(store.zarr_store(path), mode="r+")
    group.create_array(name, shape=shape, chunks=tuple(max(1, s) for s in shape), dtype="uint8")


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ({"adapt_to": TARGET, "adaptation": "cyclegan-ish"}, "adaptation", "unknown adaptation"),
        ({"select_by": "solidity"}, "select_by", "give adapt_to"),
        ({"adaptation": "ssl"}, "adapt_to", "needs a target volume"),
        ({"adapt_to": (TARGET, "flat"), "adaptation": "histogram"}, "adapt_to", "expected z, y, x"),
        ({"adapt_to": (TARGET, "empty"), "adaptation": "histogram"}, "adapt_to", "is empty"),
        (
            {"adapt_to": TARGET, "adaptation": "multitask", "members": ["1fm", "3fm"]},
            "members",
            "1fm only",
        ),
        ({"adapt_to": TARGET, "adaptation": "ssl", "input_scale": 2}, "input_scale", "must be 1"),
        ({"adapt_to": WIDE, "adaptation": "histogram"}, "adapt_to", "8-bit grey levels"),
        ({"adapt_to": ZEROS, "adaptation": "histogram"}, "adapt_to", f"{ZEROS} holds only zeros"),
    ],
)
def test_bad_adaptation_input_is_refused_at_submission(
    client: Deep3mClient,
    store: Store,
    paths: dict[str, str],
    extra: dict[str, Any],
    field: str,
    words: str,
) -> None:
    if not store.exists(f"{TARGET}/flat/zarr.json"):
        _add_array(store, TARGET, "flat", (64, 64))
        _add_array(store, TARGET, "empty", (0, 64, 64))
        write_volume(store, WIDE, np.full((4, 64, 64), 300, np.uint16))
        write_volume(store, ZEROS, np.zeros((6, 64, 64), np.uint8))  # records its levels
    target = extra.get("adapt_to")
    if isinstance(target, tuple):
        extra = {**extra, "adapt_to": common_pb2.VolumeRef(path=target[0], array=target[1])}
    before = len(client.jobs())
    # The client raises the server's INVALID_ARGUMENT as its typed error.
    with pytest.raises(InvalidArgumentError) as err:
        client.train(images=paths["images"], labels=paths["labels"], model="refused", **extra)
    assert err.value.field == field and words in err.value.message, err.value
    assert not store.exists(card_key("refused")) and len(client.jobs()) == before


def test_a_target_without_foreground_predictions_falls_back_and_says_so(
    client: Deep3mClient, store: Store, paths: dict[str, str]
) -> None:
    """A uniformly dark target (darker than anything the source labels mark) gives no
    foreground at any checkpoint: the job succeeds, keeps the last checkpoint and
    records why in the card and the member's metrics."""
    dark = "volumes/dark.zarr"
    write_volume(store, dark, np.full((4, 64, 64), 20, np.uint8))
    final = train(
        client,
        paths,
        "no-foreground",
        adapt_to=dark,
        adaptation="none",
        select_by="solidity",
        architecture="resunet2d",
        iterations=24,
        learning_rate=1e-2,
        adaptation_checkpoints=1,  # scored once trained: an untrained net marks everything
    )
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, list(final.errors)
    card = load_card(store, "no-foreground")
    chosen = card.adaptation["members"]["1fm"]
    assert chosen["chosen_checkpoint"] == "segmentation-000024"
    assert "no checkpoint predicts foreground" in card.adaptation["fallback"]
    doc = store.read_json("models/no-foreground/1fm/metrics.json")
    assert all(c["target_regions"] == 0 for c in doc["adaptation_metrics"]["candidates"])
    assert doc["adaptation_metrics"]["choice"]["fallback"] == chosen["choice"]["fallback"]


def test_prediction_applies_the_stored_histogram_mapping(
    client: Deep3mClient, store: Store, paths: dict[str, str], settings: Settings
) -> None:
    """A model whose card asks for matching predicts the target mapped onto its training
    histogram: unlike the same weights without the request, and exactly like the
    mapping applied by hand — in process and through a predict job."""
    model = "matched-at-predict"
    final = train(
        client,
        paths,
        model,
        adapt_to=TARGET,
        adaptation="none",
        architecture="resunet2d",
        match_histogram_at_predict=True,
    )
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, list(final.errors)
    card = load_card(store, model)
    reference = prediction_reference(card.adaptation)
    assert reference is not None
    # The same weights under a card that does not ask for matching.
    plain = card.model_copy(
        update={
            "id": "not-matched",
            "adaptation": {**card.adaptation, "match_histogram_at_predict": False},
        }
    )
    for m in card.members:
        store.write_bytes(f"models/not-matched/{m.weights}",
                          store.read_bytes(f"models/{model}/{m.weights}"))  # fmt: skip
    save_card(store, plain)

    raw = np.asarray(store.open_volume(TARGET)[...])
    by_hand = apply_lut(raw, lut_from_counts(volume_counts(raw), reference))
    write_volume(store, "volumes/matched-by-hand.zarr", by_hand)
    setup = PredictorSetup(Settings(store_url=store.url, device="cpu", metrics_port=0))
    core = Box.from_shape(raw.shape)

    def predict(path: str, with_model: str) -> np.ndarray:
        source = store.open_volume(path)
        return setup.predict_box(
            source, core, model=with_model, members=["1fm"], tta_level=IDENTITY_LEVEL,
            volume_id=path,
        ).probabilities  # fmt: skip

    matched = predict(TARGET, model)
    assert not np.allclose(matched, predict(TARGET, "not-matched"), atol=1e-4)
    np.testing.assert_allclose(
        matched, predict("volumes/matched-by-hand.zarr", "not-matched"), atol=1e-6
    )

    role = create_server("inference", settings, port=0, host="127.0.0.1")
    try:
        job = client.predict(TARGET, model, "volumes/predicted.zarr", tta_level=IDENTITY_LEVEL)
        for event in client.watch(job.id, timeout_s=120):
            # Later stages (the pyramid) belong to another role, not running here.
            if event.terminal or event.stage not in ("", "predict"):
                break
        final = client.get(job.id)
    finally:
        role.stop(grace=5.0)
    stage = next(s for s in final.stages if s.name == "predict")
    assert stage.tasks_done == stage.tasks_total > 0, list(final.errors)
    out = np.asarray(store.open_volume("volumes/predicted.zarr", require_complete=False)[...])
    np.testing.assert_allclose(out, matched, atol=1e-5)


def test_cli_trains_an_adapted_model_and_names_a_bad_option(
    client: Deep3mClient, store: Store, paths: dict[str, str]
) -> None:
    common = [
        "--scheduler", client.address, "train", paths["images"], paths["labels"],
        "--recipe", "cdeep3m", "--architecture", "resunet2d", "--width", "0.0625",
        "--iterations", "4", "--batch-size", "2", "--patch-shape", "32,32",
        "--learning-rate", "0.001", "--adapt-to", TARGET,
    ]  # fmt: skip
    adapt = ["--model", "cli-adapted", "--adaptation", "histogram", "--select-by", "area"]
    budget = ["--adaptation-iterations", "2", "--adaptation-checkpoints", "2"]
    result = CliRunner().invoke(app, [*common, *adapt, *budget, "--match-at-predict"])
    assert result.exit_code == 0, result.output
    card = load_card(store, "cli-adapted")
    assert (card.adaptation["method"], card.adaptation["select_by"]) == ("histogram", "area")
    assert card.adaptation["match_histogram_at_predict"] is True
    assert card.adaptation["members"]["1fm"]["choice"]["criterion"] == "area"

    bad = CliRunner().invoke(app, [*common, "--model", "cli-bad", "--adaptation", "bogus"])
    assert bad.exit_code != 0
    assert "adaptation" in bad.output and "bogus" in bad.output
    assert not store.exists(card_key("cli-bad"))


def rpc_spec(paths: dict[str, str], model: str, adaptation: str, select_by: str) -> Any:
    """A tiny adapted U-Net's spec for the TrainMember RPC."""
    return common_pb2.TrainSpec(
        model=model,
        images=common_pb2.VolumeRef(path=paths["images"]),
        labels=common_pb2.VolumeRef(path=paths["labels"]),
        adapt_to=common_pb2.VolumeRef(path=TARGET),
        adaptation=adaptation,
        select_by=select_by,
        architecture="resunet2d",
        **TINY,
    )


def test_train_member_rpc_streams_each_candidate(
    training_role: RunningServer, store: Store, paths: dict[str, str]
) -> None:
    spec = rpc_spec(paths, "rpc-adapted", "histogram", "last")
    with grpc.insecure_channel(training_role.address) as channel:
        stub = training_pb2_grpc.TrainingStub(channel)
        request = training_pb2.TrainMemberRequest(spec=spec, member="1fm")
        events = list(stub.TrainMember(request, timeout=120))
    assert events[-1].state == common_pb2.JOB_STATE_SUCCEEDED
    scored = [e for e in events if "candidate" in e.message]
    assert [int(e.metrics["iteration"]) for e in scored] == [2, 4]
    assert all("target_solidity" in e.metrics or e.metrics["target_regions"] == 0 for e in scored)
    doc = store.read_json("models/rpc-adapted/1fm/metrics.json")
    assert doc["complete"] and doc["adaptation"]["chosen_checkpoint"] == "segmentation-000004"


def test_a_member_leased_again_continues_after_its_last_scored_candidate(
    training_role: RunningServer, store: Store, paths: dict[str, str]
) -> None:
    spec = rpc_spec(paths, "rpc-resumed", "ssl", "solidity")
    request = training_pb2.TrainMemberRequest(spec=spec, member="1fm")
    member = "models/rpc-resumed/1fm"

    def scored() -> list[int]:
        with grpc.insecure_channel(training_role.address) as channel:
            events = list(training_pb2_grpc.TrainingStub(channel).TrainMember(request, timeout=120))
        assert events[-1].state == common_pb2.JOB_STATE_SUCCEEDED
        return [int(e.metrics["iteration"]) for e in events if "candidate" in e.message]

    assert scored() == [2, 4]
    whole = store.read_json(f"{member}/metrics.json")
    assert whole["resumed_from"] == 0 and whole["resumed"]["stages"] == []
    weights = store.read_bytes(f"models/rpc-resumed/{whole['weights']}")
    # What a worker lost after the first candidate leaves behind: the pretext stage and
    # that candidate recorded, nothing after them, no weights, no metrics.
    store.delete(f"{member}/adaptation/candidate-00000004.json")
    store.delete(f"{member}/adaptation/candidate-00000004.safetensors")
    store.delete(f"models/rpc-resumed/{whole['weights']}")
    store.delete(f"{member}/metrics.json")

    assert scored() == [4]  # candidate 2 is taken over, not trained and scored again
    doc = store.read_json(f"{member}/metrics.json")
    assert doc["resumed"] == {
        "stages": ["ssl-pretext"],
        "candidates": ["segmentation-000002"],
        "iterations": 2 + 2,
    }
    assert doc["resumed_from"] == 4
    assert doc["adaptation"]["chosen_checkpoint"] == whole["adaptation"]["chosen_checkpoint"]
    assert doc["adaptation_metrics"]["candidates"] == whole["adaptation_metrics"]["candidates"]
    assert doc["final"] == whole["final"]
    assert store.read_bytes(f"models/rpc-resumed/{doc['weights']}") == weights  # same network
    assert scored() == []  # a finished member is not trained again
    assert store.read_json(f"{member}/metrics.json") == doc
