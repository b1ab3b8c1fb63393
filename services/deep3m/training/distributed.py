"""Data-parallel training across the devices of one pod (DistributedDataParallel).

``train_member_distributed`` starts one process per rank (``spawn``), joins them
in a process group — NCCL over the visible GPUs, gloo on the CPU — and runs
``train_member`` in each: every rank draws its own samples, gradients are
averaged by DDP, rank 0 writes snapshots, metrics and weights to the store. The
parent reads the result back from the store. Nothing crosses process
boundaries as a pickle except plain strings, numbers and progress dicts.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import queue
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from deep3m.core.errors import CancelledError, Deep3mError, UnavailableError
from deep3m.core.events import ProgressEvent
from deep3m.core.store import Store
from deep3m.runtime.task import StopFlag
from deep3m.training.config import TrainConfig

log = logging.getLogger("deep3m.training")


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(
    rank: int,
    world: int,
    port: int,
    device_type: str,
    config_json: str,
    member: str,
    store_url: str,
    storage_options_json: str,
    job_id: str,
    events: Any,
    cancel: Any,
    errors: Any,
    dump_dir: str,
    threads: int,
) -> None:
    """One rank: join the group, train, leave the group cleanly."""
    from safetensors.torch import save_file

    from deep3m.training.trainer import train_member

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        default_backend(device_type),
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
    )
    cancelled = threading.Event()

    def watch_cancel() -> None:
        cancel.wait()
        cancelled.set()

    threading.Thread(target=watch_cancel, daemon=True).start()
    try:
        config = TrainConfig.from_json(config_json)
        store = Store(store_url, json.loads(storage_options_json) or None)

        def observer(event: ProgressEvent) -> None:
            events.put(
                {
                    "message": event.message,
                    "metrics": dict(event.metrics),
                    "eta_seconds": event.eta_seconds,
                }
            )

        result = train_member(
            config,
            member,
            store,
            observer=observer,
            cancelled=cancelled,
            device=device,
            job_id=job_id,
        )
        if dump_dir:
            save_file(
                {k: v.contiguous() for k, v in result.state_dict.items()},
                str(Path(dump_dir) / f"rank{rank}.safetensors"),
            )
        dist.barrier()  # leave together, or a rank may abort at exit
    except Deep3mError as exc:
        errors.put(
            {"rank": rank, "type": type(exc).__name__, "message": exc.message, "field": exc.field}
        )
    except Exception as exc:
        errors.put({"rank": rank, "type": type(exc).__name__, "message": str(exc), "field": ""})
    finally:
        dist.destroy_process_group()


def _raise(error: Mapping[str, Any]) -> None:
    from deep3m.core import errors as errs

    cls = getattr(errs, str(error["type"]), None)
    message = f"rank {error['rank']}: {error['message']}"
    if isinstance(cls, type) and issubclass(cls, Deep3mError):
        raise cls(message, field=str(error["field"]))
    raise UnavailableError(f"distributed training failed: {message}", field="training")


def train_member_distributed(
    config: TrainConfig,
    member: str,
    store: Store,
    world_size: int,
    *,
    device_type: str = "cpu",
    observer: Callable[[ProgressEvent], None] | None = None,
    cancelled: StopFlag | None = None,
    job_id: str = "",
    dump_rank_weights: Path | None = None,
    threads_per_rank: int = 0,
) -> Any:
    """Train ``member`` with ``world_size`` data-parallel processes; returns a MemberResult.

    ``dump_rank_weights``: a folder where every rank writes its final weights
    (``rank<N>.safetensors``), to check that the ranks agree.
    """
    from deep3m.training.trainer import completed_member, result_from_store

    already = completed_member(store, config, member)
    if already is not None:
        return result_from_store(store, config, member, already)
    ctx = mp.get_context("spawn")
    events: Any = ctx.Queue()
    errors: Any = ctx.Queue()
    cancel = ctx.Event()
    port = _free_port()
    args = (
        world_size,
        port,
        device_type,
        config.to_json(),
        member,
        store.url,
        json.dumps(store.storage_options),
        job_id,
        events,
        cancel,
        errors,
        str(dump_rank_weights or ""),
        threads_per_rank,
    )
    procs = [
        ctx.Process(target=_rank_main, args=(rank, *args), daemon=False)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    log.info("distributed training started", extra={"world_size": world_size, "member": member})

    def relay(item: dict[str, Any]) -> None:
        """Rank 0's progress, passed on as this job's event."""
        if observer is not None:
            observer(
                ProgressEvent(
                    job_id=job_id or config.model_id,
                    state="RUNNING",
                    stage="train",
                    task_id=member,
                    message=item["message"],
                    metrics=item["metrics"],
                    eta_seconds=item["eta_seconds"],
                )
            )

    try:
        while any(p.is_alive() for p in procs):
            if cancelled is not None and cancelled.is_set():
                cancel.set()
            try:
                item = events.get(timeout=0.2)
            except queue.Empty:
                continue
            relay(item)
    finally:
        for p in procs:
            p.join()
    while True:
        try:
            item = events.get_nowait()
        except queue.Empty:
            break
        relay(item)
    failures = []
    while True:
        try:
            failures.append(errors.get_nowait())
        except queue.Empty:
            break
    if failures:
        _raise(sorted(failures, key=lambda e: e["rank"])[0])
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise UnavailableError(f"a training process exited with code {bad[0]}", field="training")
    if cancelled is not None and cancelled.is_set():
        raise CancelledError(f"training of {config.model_id}/{member} cancelled", field="job")
    done = completed_member(store, config, member)
    if done is None:
        raise UnavailableError(
            f"distributed training of {member} ended without weights", field="training"
        )
    return result_from_store(store, config, member, done)
