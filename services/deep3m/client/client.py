"""The Python client of the deep3m scheduler.

```python
with Deep3mClient("127.0.0.1:50051") as client:
    job = client.predict("volumes/stack.zarr", "mito", "volumes/stack-prob.zarr")
    for event in client.watch(job.id):
        print(event.stage, event.tasks_done, event.tasks_total)
    job = client.wait(job.id, timeout_s=3600)
```

Volume arguments are paths in the scheduler's default store, or full
``VolumeRef`` messages for other stores. Jobs come back as ``common_pb2.Job``
messages (``state_from_proto(job.state)`` names the state, ``is_terminal``
tells whether it ended); progress as ``deep3m.core.events.ProgressEvent``.
Every unary call has a deadline;
gRPC errors come back as the matching ``Deep3mError`` subclass with the
server's message and the offending field.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from deep3m.core.errors import InvalidArgumentError, UnavailableError
from deep3m.core.events import ProgressEvent
from deep3m.core.retry import Backoff
from deep3m.runtime.channel import ChannelSecurity, open_channel
from deep3m.runtime.progress_proto import (
    TERMINAL_STATES,
    event_from_proto,
    state_from_proto,
    state_to_proto,
)
from deep3m.runtime.rpc_errors import from_rpc_error, status_code
from deep3m.runtime.worker import WORKER_CHANNEL_OPTIONS
from deep3m.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

Volume = str | common_pb2.VolumeRef
PAGE_SIZE = 200  # jobs per ListJobs reply


def volume_ref(volume: Volume, *, name: str = "volume") -> common_pb2.VolumeRef:
    """A path in the default store (``"volumes/x.zarr"``) or a ``VolumeRef`` as is."""
    if isinstance(volume, common_pb2.VolumeRef):
        return volume
    if not isinstance(volume, str) or not volume:
        raise InvalidArgumentError(
            f"{name} must be a non-empty store path or a VolumeRef, got {volume!r}", field=name
        )
    return common_pb2.VolumeRef(path=volume)


def _optional_ref(volume: Volume | None, name: str) -> common_pb2.VolumeRef | None:
    return volume_ref(volume, name=name) if volume is not None else None


def is_terminal(job: common_pb2.Job) -> bool:
    """Whether the job has ended (succeeded, failed or was cancelled)."""
    return state_from_proto(job.state) in TERMINAL_STATES


class Deep3mClient:
    """A connection to the scheduler at ``address`` (``host:port``)."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 30.0,
        token: str = "",
        tls: bool = False,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        server_name: str = "",
        security: ChannelSecurity | None = None,
    ) -> None:
        """``token``: the bearer token (client kind); ``tls``: verify the server against
        ``ca_file`` (default: the system roots), presenting ``cert_file``/``key_file``
        for mutual TLS. ``security`` gives all of these at once
        (``ChannelSecurity.from_settings(settings)``)."""
        if not address or ":" not in address:
            raise InvalidArgumentError(f"address {address!r} must be host:port", field="address")
        if timeout_s <= 0:
            raise InvalidArgumentError(f"timeout_s must be > 0, got {timeout_s}", field="timeout_s")
        self.address = address
        self.timeout_s = timeout_s
        security = security or ChannelSecurity(
            token=token,
            tls=tls or bool(ca_file or cert_file),
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            server_name=server_name,
        )
        self._channel = open_channel(address, security, options=WORKER_CHANNEL_OPTIONS)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    # -- plumbing -----------------------------------------------------------------------
    def _call(self, method: Any, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as err:
            raise from_rpc_error(err, address=self.address) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Deep3mClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- jobs -----------------------------------------------------------------------------
    def submit(self, spec: common_pb2.JobSpec, job_id: str = "") -> common_pb2.Job:
        """Submit a job; resubmitting the same ``job_id`` and spec returns the existing job."""
        return self._call(
            self._stub.SubmitJob, scheduler_pb2.SubmitJobRequest(spec=spec, job_id=job_id)
        )

    def predict(
        self,
        input: Volume,
        model: str,
        output: Volume,
        *,
        tta_level: int = 0,
        members: Sequence[str] = (),
        block_shape: Sequence[int] = (),
        halo: Sequence[int] = (),
        postprocess: bool = False,
        threshold: float = 0.0,
        overwrite: bool = False,
        name: str = "",
        max_attempts: int = 0,
        job_id: str = "",
        ground_truth: Volume | None = None,
        min_size_voxels: int = 0,
        exclusion_zone_voxels: int = 0,
    ) -> common_pb2.Job:
        """Segment ``input`` with ``model`` into a probability volume at ``output``; with
        ``postprocess``, label it (dropping objects under ``min_size_voxels``) and, given a
        ``ground_truth``, evaluate it."""
        spec = common_pb2.JobSpec(
            name=name,
            max_attempts=max_attempts,
            predict=common_pb2.PredictSpec(
                input=volume_ref(input, name="input"),
                model=model,
                output=volume_ref(output, name="output"),
                tta_level=tta_level,
                members=list(members),
                block_shape=list(block_shape),
                halo=list(halo),
                postprocess=postprocess,
                threshold=threshold,
                overwrite=overwrite,
                labelling=common_pb2.LabelSpec(
                    min_size_voxels=min_size_voxels,
                    ground_truth=_optional_ref(ground_truth, "ground_truth"),
                    exclusion_zone_voxels=exclusion_zone_voxels,
                ),
            ),
        )
        return self.submit(spec, job_id)

    def label(
        self,
        input: Volume,
        *,
        output: Volume | None = None,
        threshold: float = 0.0,
        connectivity: int = 0,
        min_size_voxels: int = 0,
        watershed: bool = False,
        label_name: str = "",
        block_shape: Sequence[int] = (),
        name: str = "",
        max_attempts: int = 0,
        job_id: str = "",
        ground_truth: Volume | None = None,
        exclusion_zone_voxels: int = 0,
    ) -> common_pb2.Job:
        """Label the probability (or mask) volume ``input`` on the postprocess workers:
        labels in ``<input>/labels/<label_name>`` (or ``output``) and an object table;
        given a ``ground_truth``, the voxel and object accuracy too."""
        spec = common_pb2.JobSpec(
            name=name,
            max_attempts=max_attempts,
            label=common_pb2.LabelSpec(
                input=volume_ref(input, name="input"),
                output=volume_ref(output, name="output") if output is not None else None,
                threshold=threshold,
                connectivity=connectivity,
                min_size_voxels=min_size_voxels,
                watershed=watershed,
                name=label_name,
                block_shape=list(block_shape),
                ground_truth=_optional_ref(ground_truth, "ground_truth"),
                exclusion_zone_voxels=exclusion_zone_voxels,
            ),
        )
        return self.submit(spec, job_id)

    def train(
        self,
        images: Volume,
        labels: Volume,
        model: str,
        *,
        validation_images: Volume | None = None,
        validation_labels: Volume | None = None,
        architecture: str = "",
        width: float = 0.0,
        members: Sequence[str] = (),
        iterations: int = 0,
        base_model: str = "",
        add_iterations: int = 0,
        batch_size: int = 0,
        patch_shape: Sequence[int] = (),
        validate_every: int = 0,
        snapshot_every: int = 0,
        snapshot_every_minutes: float = 0.0,
        intensity_augmentations: Sequence[str] = (),
        learning_rate: float = 0.0,
        accumulate_gradients: int = 0,
        voxel_size_nm: Sequence[float] = (),
        num_classes: int = 0,
        seed: int = 0,
        recipe: str = "",
        max_minutes: float = 0.0,
        optimizer: str = "",
        loss: str = "",
        schedule: str = "",
        input_scale: int = 0,
        foreground_fraction: float = 0.0,
        adapt_to: Volume | None = None,
        adaptation: str = "",
        select_by: str = "",
        adaptation_iterations: int = 0,
        adaptation_checkpoints: int = 0,
        match_histogram_at_predict: bool = False,
        name: str = "",
        max_attempts: int = 0,
        job_id: str = "",
    ) -> common_pb2.Job:
        """Train model ``model`` (one task per ensemble member).

        Zero/empty values take the ``recipe``'s (``default`` or ``cdeep3m``).
        ``adapt_to`` (an unlabelled volume) with ``adaptation`` trains for that
        volume by a label-free domain-adaptation method, keeping the checkpoint
        ``select_by`` chooses (``validation``, ``solidity``, ``area``, ``last``).
        """
        train = common_pb2.TrainSpec(
            images=volume_ref(images, name="images"),
            labels=volume_ref(labels, name="labels"),
            model=model,
            architecture=architecture,
            width=width,
            members=list(members),
            iterations=iterations,
            base_model=base_model,
            add_iterations=add_iterations,
            batch_size=batch_size,
            patch_shape=list(patch_shape),
            validate_every=validate_every,
            snapshot_every=snapshot_every,
            snapshot_every_minutes=snapshot_every_minutes,
            intensity_augmentations=list(intensity_augmentations),
            learning_rate=learning_rate,
            accumulate_gradients=accumulate_gradients,
            voxel_size_nm=list(voxel_size_nm),
            num_classes=num_classes,
            seed=seed,
            recipe=recipe,
            max_minutes=max_minutes,
            optimizer=optimizer,
            loss=loss,
            schedule=schedule,
            input_scale=input_scale,
            foreground_fraction=foreground_fraction,
            adaptation=adaptation,
            select_by=select_by,
            adaptation_iterations=adaptation_iterations,
            adaptation_checkpoints=adaptation_checkpoints,
            match_histogram_at_predict=match_histogram_at_predict,
        )
        if adapt_to is not None:
            train.adapt_to.CopyFrom(volume_ref(adapt_to, name="adapt_to"))
        if validation_images is not None:
            train.validation_images.CopyFrom(
                volume_ref(validation_images, name="validation_images")
            )
        if validation_labels is not None:
            train.validation_labels.CopyFrom(
                volume_ref(validation_labels, name="validation_labels")
            )
        return self.submit(
            common_pb2.JobSpec(name=name, max_attempts=max_attempts, train=train), job_id
        )

    def ingest(
        self,
        source: str,
        output: Volume,
        *,
        voxel_size_nm: Sequence[float] = (),
        chunk_shape: Sequence[int] = (),
        shard_shape: Sequence[int] = (),
        slices_per_task: int = 0,
        overwrite: bool = False,
        name: str = "",
        max_attempts: int = 0,
        job_id: str = "",
    ) -> common_pb2.Job:
        """Ingest an image stack (TIFF, PNG folder, HDF5, MRC, zarr) into an OME-Zarr volume."""
        spec = common_pb2.JobSpec(
            name=name,
            max_attempts=max_attempts,
            ingest=common_pb2.IngestSpec(
                source=source,
                output=volume_ref(output, name="output"),
                voxel_size_nm=list(voxel_size_nm),
                chunk_shape=list(chunk_shape),
                shard_shape=list(shard_shape),
                slices_per_task=slices_per_task,
                overwrite=overwrite,
            ),
        )
        return self.submit(spec, job_id)

    def get(self, job_id: str) -> common_pb2.Job:
        return self._call(self._stub.GetJob, scheduler_pb2.GetJobRequest(job_id=job_id))

    def jobs(self, states: Iterable[str] = (), limit: int = 0) -> list[common_pb2.Job]:
        """Jobs, newest first; ``states`` like ``("RUNNING", "PENDING")`` filters.

        ``limit`` 0 means all of them, fetched page by page.
        """
        out: list[common_pb2.Job] = []
        token = ""
        while True:
            want = min(limit - len(out), PAGE_SIZE) if limit else PAGE_SIZE
            request = scheduler_pb2.ListJobsRequest(
                states=[state_to_proto(s) for s in states], limit=want, page_token=token
            )
            reply = self._call(self._stub.ListJobs, request)
            out.extend(reply.jobs)
            token = reply.next_page_token
            if not token or (limit and len(out) >= limit):
                return out

    def cancel(self, job_id: str) -> common_pb2.Job:
        return self._call(self._stub.CancelJob, scheduler_pb2.CancelJobRequest(job_id=job_id))

    def watch(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        on_resume: Callable[[], None] | None = None,
        reconnect_s: float = 300.0,
    ) -> Iterator[ProgressEvent]:
        """The job's progress: its current state first, then every event until it ends.

        A stream the scheduler drops (it restarted, or the connection broke) is
        opened again with backoff for up to ``reconnect_s``, and ``on_resume`` is
        called once it answers; the new stream starts with the job's current
        state, so only intermediate events are missed. A scheduler that cannot be
        reached at the first attempt raises UnavailableError at once. ``timeout_s``
        bounds the whole watch, reconnections included (TimeoutError when it runs
        out); by default it runs as long as the job.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        backoff = Backoff(initial_s=0.2, max_s=5.0, jitter=0.2)
        pause = threading.Event()
        lost_at: float | None = None
        answered = False
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"watching job {job_id!r}: no end within {timeout_s} s")
            call = self._stub.WatchJob(
                scheduler_pb2.WatchJobRequest(job_id=job_id), timeout=remaining
            )
            try:
                for msg in call:
                    answered = True
                    if lost_at is not None:
                        lost_at = None
                        backoff.reset()
                        if on_resume is not None:
                            on_resume()
                    yield event_from_proto(msg)
                return
            except grpc.RpcError as err:
                code = status_code(err)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(
                        f"watching job {job_id!r}: no end within {timeout_s} s"
                    ) from None
                if not (answered and _stream_lost(err)):
                    raise from_rpc_error(err, address=self.address) from None
                lost_at = time.monotonic() if lost_at is None else lost_at
                if time.monotonic() - lost_at > reconnect_s:
                    raise from_rpc_error(err, address=self.address) from None
            finally:
                call.cancel()
            wait_s = backoff.next_delay()
            if deadline is not None:
                wait_s = min(wait_s, max(deadline - time.monotonic(), 0.0))
            pause.wait(wait_s)

    def wait(self, job_id: str, timeout_s: float) -> common_pb2.Job:
        """Block until the job ends (across scheduler restarts); TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        pause = threading.Event()
        backoff = Backoff(initial_s=0.1, max_s=2.0)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"job {job_id!r} did not end within {timeout_s} s")
            try:
                for event in self.watch(job_id, timeout_s=remaining):
                    if event.terminal:
                        return self.get(job_id)
                job = self.get(job_id)
                if is_terminal(job):
                    return job
            except UnavailableError:
                # The scheduler went away between the stream and the call: try again.
                pause.wait(min(backoff.next_delay(), max(deadline - time.monotonic(), 0.0)))

    def queue_stats(self) -> dict[str, dict[str, int]]:
        """``{role: {"pending": n, "leased": n}}`` for every worker role."""
        reply = self._call(self._stub.GetQueueStats, scheduler_pb2.GetQueueStatsRequest())
        return {r.role: {"pending": int(r.pending), "leased": int(r.leased)} for r in reply.roles}


def _stream_lost(err: grpc.RpcError) -> bool:
    """Whether a watch stream ended because the scheduler went away, not because of the job."""
    code = status_code(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    # A server killed mid-stream: gRPC reports the half-read stream as UNKNOWN/INTERNAL.
    details = (err.details() if isinstance(err, grpc.Call) else "") or ""
    return code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and any(
        text in details for text in ("Stream removed", "Socket closed", "Connection reset")
    )
