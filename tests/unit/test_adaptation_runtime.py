"""The adaptation stages' runtime: the device and precision they run on, their
progress reports, cancellation within one iteration of any stage (and one predicted
batch of a candidate's scoring), and the member's reading of located volumes."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import numpy as np
import pytest
import torch
from deep3m.adaptation.histogram import reference_histogram
from deep3m.core.errors import CancelledError, InvalidArgumentError, NotFoundError
from deep3m.core.events import ProgressEvent
from deep3m.core.grey_levels import recorded_levels
from deep3m.core.store import Store
from deep3m.models.translation import TranslationConfig, build_translator
from deep3m.testing.training import stage_synthetic, synthetic_stack, tiny_config
from deep3m.testing.volumes import write_volume as write_plain_volume
from deep3m.training.adaptation.data import Domain, PatchSampler
from deep3m.training.adaptation.loops import Schedule, run_stage
from deep3m.training.adaptation.member import CANDIDATE_METRIC, adapt_member
from deep3m.training.adaptation.runtime import (
    StageProgress,
    StageRuntime,
    current,
    use,
)
from deep3m.training.adaptation.translation import train_translator
from deep3m.training.config import VolumeSource
from deep3m.training.demo_data import write_volume
from deep3m.training.precision import precision_for
from deep3m.training.trainer import pick_device
from deep3m.training.validate import Located
from torch import nn


class Stop(Exception):
    pass


def ticking_clock(step_s: float = 1.0) -> Iterator[float]:
    return (i * step_s for i in count())


def test_precision_follows_the_supervised_rule() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert precision_for(cuda, mixed_precision=True, cpu_bfloat16=True) == "float16"
    assert precision_for(cuda, mixed_precision=False, cpu_bfloat16=True) == "float32"
    assert precision_for(cpu, mixed_precision=True, cpu_bfloat16=True) == "bfloat16"
    assert precision_for(cpu, mixed_precision=True, cpu_bfloat16=False) == "float32"


def test_stage_moves_its_modules_and_samples_to_the_runtime_device() -> None:
    # The meta device stands for an accelerator: nothing may fall back to the CPU.
    net = nn.Conv2d(1, 2, 3, padding=1)
    images, labels = synthetic_stack(3, 32, seed=0)
    sampler = PatchSampler(Domain.of("s", images, labels), patch=16, frames=1, seed=0)
    seen: list[torch.device] = []

    def loss_fn() -> torch.Tensor:
        x, y = sampler.labelled_sample(2)
        seen.extend([next(net.parameters()).device, x.device, y.device])
        raise Stop

    with use(StageRuntime(device=torch.device("meta"))), pytest.raises(Stop):
        run_stage("s", loss_fn, train=[net], schedule=Schedule(3, 1e-3))
    assert [d.type for d in seen] == ["meta", "meta", "meta"]
    assert current().device == torch.device("cpu")  # reset outside ``use``


def test_stage_computes_under_the_runtime_autocast() -> None:
    net = nn.Linear(4, 1)
    dtypes: list[torch.dtype] = []

    def loss_fn() -> torch.Tensor:
        out = net(torch.ones(2, 4))
        dtypes.append(out.dtype)
        return out.float().pow(2).mean()

    with use(StageRuntime(device=torch.device("cpu"), precision="bfloat16")):
        run_stage("s", loss_fn, train=[net], schedule=Schedule(1, 1e-3))
    run_stage("s", loss_fn, train=[net], schedule=Schedule(1, 1e-3))
    assert dtypes == [torch.bfloat16, torch.float32]


def test_stage_reports_every_few_seconds_and_stops_on_cancel() -> None:
    net = nn.Linear(4, 1)
    calls = [0]
    events: list[StageProgress] = []
    cancelled = threading.Event()

    def loss_fn() -> torch.Tensor:
        calls[0] += 1
        return net(torch.ones(2, 4)).pow(2).mean()

    def on_progress(p: StageProgress) -> None:
        events.append(p)
        if p.iteration >= 6:
            cancelled.set()

    clock = ticking_clock()
    rt = StageRuntime(
        on_progress=on_progress,
        cancelled=cancelled,
        progress_seconds=2.0,
        clock=lambda: next(clock),
    )
    with use(rt), pytest.raises(CancelledError, match="'pretext' at iteration 6"):
        run_stage("pretext", loss_fn, train=[net], schedule=Schedule(10_000, 1e-3))
    assert calls[0] == 6  # stopped at the iteration the cancel was seen
    assert [p.iteration for p in events] == [2, 4, 6]
    assert all(p.stage == "pretext" and np.isfinite(p.loss) for p in events)


def test_translator_stage_reports_and_cancels() -> None:
    images, _ = synthetic_stack(2, 32, seed=1)
    cfg = dataclasses.replace(TranslationConfig.cpu(), patch=32, ngf=4, ndf=4, n_blocks=1)
    translator = build_translator(cfg)
    cancelled = threading.Event()
    events: list[StageProgress] = []

    def on_progress(p: StageProgress) -> None:
        events.append(p)
        cancelled.set()

    with (
        use(StageRuntime(on_progress=on_progress, cancelled=cancelled, progress_seconds=0.0)),
        pytest.raises(CancelledError, match="translation-cut' at iteration 1"),
    ):
        train_translator(
            translator,
            Domain.of("a", images),
            Domain.of("b", 255 - images),
            iterations=10_000,
            batch=1,
            seed=0,
        )
    assert [(p.stage, p.iteration) for p in events] == [("translation-cut", 1)]


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, dict[str, str]]:
    store = Store(f"file://{tmp_path_factory.mktemp('adapt-rt') / Path('store')}")
    paths = stage_synthetic(store, depth=4, size=32, validation=False)
    images, _ = synthetic_stack(3, 32, seed=5)
    paths["target"] = write_volume(store, "volumes/target.zarr", (255 - images // 2))
    return store, paths


def _config(paths: dict[str, str], model: str, **extra: object):  # type: ignore[no-untyped-def]
    return tiny_config(
        paths,
        model,
        architecture="resunet2d",
        adapt_to=VolumeSource(path=paths["target"]),
        batch_size=1,
        patch_shape=[32, 32],
        **extra,
    )


def test_member_runs_on_the_chosen_device_and_reports_stages(
    staged: tuple[Store, dict[str, str]],
) -> None:
    store, paths = staged
    config = _config(
        paths, "rt-ssl", adaptation="ssl", select_by="last", iterations=2,
        adaptation_iterations=2, adaptation_checkpoints=1,
    )  # fmt: skip
    events: list[ProgressEvent] = []
    adapt_member(config, "1fm", store, observer=events.append, progress_seconds=0.0)
    doc = store.read_json("models/rt-ssl/1fm/metrics.json")
    assert doc["device"] == pick_device(None).type
    assert doc["precision"] in ("float32", "float16", "bfloat16")
    stages = [e.message for e in events if "loss" in e.metrics]
    assert any("ssl-pretext iteration 2/2" in m for m in stages)
    assert any("segmentation iteration 2/2" in m for m in stages)
    assert any(CANDIDATE_METRIC in e.metrics for e in events)
    adapt_member(config, "1fm", store, device=torch.device("cpu"))
    assert store.read_json("models/rt-ssl/1fm/metrics.json")["device"] == "cpu"


def test_cancel_mid_pretext_returns_promptly(staged: tuple[Store, dict[str, str]]) -> None:
    store, paths = staged
    config = _config(
        paths, "rt-cancel", adaptation="ssl", iterations=2, adaptation_iterations=100_000
    )
    cancelled = threading.Event()

    def observer(event: ProgressEvent) -> None:
        if "pretext" in event.message:
            cancelled.set()

    with pytest.raises(CancelledError, match="'ssl-pretext' at iteration 1"):
        adapt_member(config, "1fm", store, observer=observer, cancelled=cancelled,
                     progress_seconds=0.0)  # fmt: skip
    assert not store.exists("models/rt-cancel/1fm/metrics.json")


@pytest.mark.parametrize("recorded", [True, False])
def test_an_all_zero_target_is_refused_naming_adapt_to(
    staged: tuple[Store, dict[str, str]], recorded: bool
) -> None:
    store, paths = staged
    zeros = np.zeros((2, 32, 32), np.uint8)
    flat = f"volumes/zeros-{recorded}.zarr"
    if recorded:  # refused by the recorded grey levels (and at submission)
        write_volume(store, flat, zeros)
    else:  # a volume without them (an older writer): refused once read
        write_plain_volume(store, flat, zeros, (2, 32, 32))
    assert (recorded_levels(store.volume_info(flat).attributes) is not None) == recorded
    config = _config({**paths, "target": flat}, "rt-flat", adaptation="histogram")
    with pytest.raises(InvalidArgumentError, match=f"{flat} holds only zeros") as err:
        adapt_member(config, "1fm", store)
    assert err.value.field == "adapt_to"


def _located(store: Store, keys: dict[str, str]) -> dict[str, Located]:
    return {name: Located(store, key, store.volume_info(key)) for name, key in keys.items()}


def test_member_reads_the_volumes_where_they_were_located(
    staged: tuple[Store, dict[str, str]],
) -> None:
    store, paths = staged
    # The job's references no longer resolve: only the located volumes can be read.
    gone = {name: f"volumes/gone-{name}.zarr" for name in ("images", "labels", "target")}
    config = _config(gone, "rt-located", adaptation="histogram", select_by="last",
                     iterations=1, adaptation_checkpoints=1)  # fmt: skip
    with pytest.raises(NotFoundError):
        adapt_member(config, "1fm", store)
    located = _located(store, {"images": paths["images"], "labels": paths["labels"],
                               "adapt_to": paths["target"]})  # fmt: skip
    adapt_member(config, "1fm", store, located=located)
    doc = store.read_json("models/rt-located/1fm/metrics.json")
    target = np.asarray(store.open_volume(paths["target"])[:])
    # Pooled from the target's recorded counts, equal to pooling its images.
    assert doc["adaptation"]["target_histogram"] == reference_histogram(target).to_dict()
    assert doc["voxel_size_nm"] == list(store.volume_info(paths["images"]).voxel_size_nm)


def test_cancel_while_a_candidate_is_scored_stops_within_one_batch(
    staged: tuple[Store, dict[str, str]],
) -> None:
    store, paths = staged
    images, _ = synthetic_stack(8, 32, seed=9)
    deep = write_volume(store, "volumes/deep-target.zarr", 255 - images // 2)
    config = _config({**paths, "target": deep}, "rt-score-cancel", adaptation="histogram",
                     select_by="last", iterations=2, adaptation_checkpoints=1)  # fmt: skip
    cancelled = threading.Event()
    calls: list[type] = []

    def cancel_on_first_prediction(module: nn.Module, args: object) -> None:
        # Only a candidate's scoring predicts under inference mode (training does not).
        if torch.is_inference_mode_enabled():
            if not calls:
                cancelled.set()
            calls.append(type(module))

    hook = nn.modules.module.register_module_forward_pre_hook(cancel_on_first_prediction)
    try:
        with pytest.raises(CancelledError, match="while predicting slice 2 of 8"):
            adapt_member(config, "1fm", store, cancelled=cancelled)
    finally:
        hook.remove()
    # The network (the first module a batch enters) ran once: one batch of the 8-slice
    # target, not the whole scoring of the target and the source validation.
    assert calls.count(calls[0]) == 1
    assert not store.exists("models/rt-score-cancel/1fm/metrics.json")
