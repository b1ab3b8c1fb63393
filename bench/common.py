"""Shared set-up of the prediction benchmarks: volumes from the real slices, a model,
and a scheduler plus an inference worker as processes on loopback (``deep3m serve``,
as ``deep3m up`` runs them) over a local zarr store."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "cdeep3m-mito"
MEMBER = "1fm"


def load_slices(size: int) -> np.ndarray:
    """The 30 labelled cdeep3m-mito slices (training, then validation), cropped to size²."""
    from PIL import Image

    files = sorted((DATA / "training" / "images").glob("images.*.png")) + sorted(
        (DATA / "validation" / "images").glob("images.*.png")
    )
    if not files:
        raise SystemExit(f"no images under {DATA.resolve()}: the benchmark needs the shared data")
    stack = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])
    if stack.shape[1] < size or stack.shape[2] < size:
        pad_y, pad_x = max(0, size - stack.shape[1]), max(0, size - stack.shape[2])
        stack = np.pad(stack, ((0, 0), (0, pad_y), (0, pad_x)), mode="reflect")
    return np.ascontiguousarray(stack[:, :size, :size])


def build_volume(slices: int, size: int) -> tuple[np.ndarray, str]:
    """``slices`` × size² from the real slices, mirrored in z (1…30, 29…1, …) when needed."""
    real = load_slices(size)
    n = real.shape[0]
    order: list[int] = []
    forward = True
    while len(order) < slices:
        step = list(range(n)) if forward else list(range(n - 2, 0, -1))
        order += step or [0]
        forward = not forward
    volume = np.ascontiguousarray(real[order[:slices]])
    note = f"{slices}×{size}×{size} uint8 from the {n} real cdeep3m-mito slices"
    if slices > n:
        note += f" (z mirrored at slice {n} to reach {slices})"
    return volume, note


def make_model(width: float, *, seed: int = 0) -> tuple[Any, nn.Module]:
    """A DeepEM3D 1fm card and network with random weights (throughput ignores weights)."""
    from deep3m.models.card import MemberCard, ModelCard
    from deep3m.models.registry import build_network

    torch.manual_seed(seed)
    card = ModelCard(
        id="bench",
        architecture="deepem3d",
        width=width,
        members=(MemberCard(name=MEMBER, frames=1),),
        normalization_mean=128.0,
        normalization_std=64.0,
    )
    net = build_network("deepem3d", frames=1, width=width).eval()
    return card, net


class LocalPrediction:
    """A scheduler and an inference worker as processes, with one input volume and model."""

    def __init__(
        self,
        root: Path,
        volume: np.ndarray,
        card: Any,
        net: nn.Module,
        *,
        batch: int,
        env: dict[str, str] | None = None,
    ) -> None:
        from deep3m.core.store import Store
        from deep3m.launcher.local import LocalCluster, LocalClusterSpec
        from deep3m.models.card import save_model

        self.store = Store(str(root / "store"))
        arr = self.store.create_volume("volumes/in.zarr", volume.shape, "uint8")
        arr[...] = volume
        self.store.mark_complete("volumes/in.zarr")
        save_model(self.store, card, {MEMBER: net.state_dict()})
        extra = {
            "DEEP3M_DEVICE": "cpu",
            "DEEP3M_BATCH_SIZE": str(batch),
            "DEEP3M_POLL_INTERVAL_SECONDS": "0.05",
            "DEEP3M_LOG_LEVEL": "WARNING",
            **(env or {}),
        }
        self.cluster = LocalCluster(
            LocalClusterSpec(
                store_url=self.store.url,
                roles=("scheduler", "inference"),
                base_ports={"scheduler": 0, "inference": 0},
                log_dir=root / "logs",
                extra_env=extra,
            )
        )
        self.cluster.start(free_ports=True)
        self.runs = 0

    def worker_config(self) -> str:
        """The inference worker's compute settings, as the launcher gave them."""
        env = self.cluster.environment("inference")
        return (
            f"torch threads {env.get('DEEP3M_TORCH_THREADS', 'all')}, "
            f"{env.get('DEEP3M_WORKER_CAPACITY', '1')} block(s) computing at once, "
            f"pipeline depth {env.get('DEEP3M_INFERENCE_PIPELINE_DEPTH', 'default')}"
        )

    @property
    def worker_pid(self) -> int:
        return int(self.cluster.processes["inference"].pid)

    def predict(
        self, *, block_shape: Sequence[int] = (), keep: bool = True
    ) -> tuple[float, np.ndarray | None, tuple[int, ...]]:
        """Seconds from submit until every predict block is written; the output; the block."""
        from deep3m.client.client import Deep3mClient

        self.runs += 1
        output = f"volumes/out-{self.runs}.zarr"
        with Deep3mClient(self.cluster.scheduler_address, timeout_s=60) as client:
            t0 = time.perf_counter()
            job = client.predict(
                "volumes/in.zarr",
                "bench",
                output,
                tta_level=10,
                members=[MEMBER],
                block_shape=list(block_shape),
            )
            # The predict stage is what this measures; a later stage (finalize) is not.
            for event in client.watch(job.id, timeout_s=3600):
                if event.terminal or event.stage not in ("", "predict"):
                    break
                if event.tasks_total and event.tasks_done == event.tasks_total:
                    break
            seconds = time.perf_counter() - t0
            final = client.get(job.id)
        stage = [s for s in final.stages if s.name == "predict"]
        if not stage or stage[0].tasks_done != stage[0].tasks_total or final.errors:
            raise RuntimeError(f"predict job {job.id} did not finish its blocks: {final}")
        block = tuple(int(b) for b in final.spec.predict.block_shape)
        out = None
        if keep:
            out = np.asarray(self.store.open_volume(output, require_complete=False)[...])
        self.store.delete(output)
        return seconds, out, block

    def close(self) -> None:
        self.cluster.stop()
