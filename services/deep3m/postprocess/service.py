"""The ``deep3m.v1.Postprocess`` servicer: requests in, plain module calls, replies out.

Volume references are resolved against the configured store roots; the
store's generic "volume" field in errors is renamed to the request field the
user set (``probabilities.path``, ``ground_truth.path``, ...).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from deep3m.core.errors import Deep3mError, InvalidArgumentError, clip
from deep3m.core.locations import RESERVED_PREFIXES, StoreRoots
from deep3m.core.store import Store, check_key, normalize_url
from deep3m.postprocess.evaluate import (
    EvaluateSpec,
    Operand,
    OverlayRequest,
    evaluate_with_overlays,
)
from deep3m.postprocess.export import FORMATS, export_overlay, export_volume, refuse_existing
from deep3m.postprocess.foreground import check_threshold, volume_kind
from deep3m.postprocess.labels import DEFAULT_LABEL_NAME, LabelSpec, label_volume
from deep3m.postprocess.pyramid import build_pyramid
from deep3m.v1 import common_pb2, postprocess_pb2, postprocess_pb2_grpc

SERVICE_NAME = postprocess_pb2.DESCRIPTOR.services_by_name["Postprocess"].full_name
# Object rows returned inline; the full table is in the store.
MAX_OBJECT_ROWS = 1000


@contextlib.contextmanager
def _naming(field: str) -> Iterator[None]:
    """Re-raise store errors about "volume"/"array" as errors about ``field``."""
    try:
        yield
    except Deep3mError as exc:
        if exc.field in ("volume", "path"):
            raise type(exc)(exc.message, field=f"{field}.path") from exc
        if exc.field == "array":
            raise type(exc)(exc.message, field=f"{field}.array") from exc
        raise


def _cancelled_with(context: grpc.ServicerContext) -> threading.Event:
    # The callback fires when the RPC ends for any reason, including a client
    # cancelling or its deadline passing; blockwise loops stop at the next block.
    event = threading.Event()
    context.add_callback(event.set)
    return event


class PostprocessServicer(postprocess_pb2_grpc.PostprocessServicer):
    def __init__(self, roots: StoreRoots, *, restrict_local: bool = False,
                 max_workers: int = 1) -> None:  # fmt: skip
        self.roots = roots
        self.restrict_local = restrict_local
        self.max_workers = max_workers

    def _resolve(self, ref: common_pb2.VolumeRef, field: str) -> tuple[Store, str]:
        return self.roots.resolve(ref.store_url, ref.path, field=field)

    def _open(self, ref: common_pb2.VolumeRef, field: str) -> tuple[Any, dict[str, Any]]:
        store, key = self._resolve(ref, field)
        with _naming(field):
            info = store.volume_info(key, ref.array)
            return store.open_volume(key, ref.array), dict(info.attributes)

    def Label(self, request: Any, context: grpc.ServicerContext) -> Any:
        spec = LabelSpec(
            threshold=check_threshold(request.threshold),
            watershed=request.watershed,
            min_size_voxels=int(request.min_size_voxels),
        )
        store, key = self._resolve(request.probabilities, "probabilities")
        output = self._resolve(request.output, "output") if request.output.path else None
        with _naming("probabilities"):
            result = label_volume(
                store, key, spec,
                array=request.probabilities.array, output=output,
                name=request.name or DEFAULT_LABEL_NAME, max_workers=self.max_workers,
                cancelled=_cancelled_with(context),
            )  # fmt: skip
        reply = postprocess_pb2.LabelResponse(
            labels=common_pb2.VolumeRef(store_url=result.store_url, path=result.labels_path),
            object_count=result.object_count,
            tables=[f"{result.store_url}/{k}" for k in result.table_keys],
        )
        table = result.objects
        for i in range(min(len(table), MAX_OBJECT_ROWS)):
            reply.objects.add(
                label=int(table.labels[i]),
                volume_voxels=int(table.volume_voxels[i]),
                centroid=[float(v) for v in table.centroid[i]],
                bbox=common_pb2.Box(
                    start=[int(v) for v in table.bbox_start[i]],
                    stop=[int(v) for v in table.bbox_stop[i]],
                ),
            )
        return reply

    def Evaluate(self, request: Any, context: grpc.ServicerContext) -> Any:
        spec = EvaluateSpec(
            threshold=check_threshold(request.threshold),
            exclusion_zone_voxels=int(request.exclusion_zone_voxels),
            min_size_voxels=int(request.min_size_voxels),
        )
        prediction, pred_attrs = self._open(request.prediction, "prediction")
        truth, truth_attrs = self._open(request.ground_truth, "ground_truth")
        overlays = None
        if request.overlays:
            destination = self._destination(request.overlays, overwrite=True, field="overlays")
            image = self._open(request.image, "image")[0] if request.image.path else None
            overlays = OverlayRequest(
                destination, image, list(request.overlay_slices) or None,
                self._storage_options(destination),
            )  # fmt: skip
        result = evaluate_with_overlays(
            Operand.of(prediction, pred_attrs), Operand.of(truth, truth_attrs), spec, overlays,
            max_workers=self.max_workers, cancelled=_cancelled_with(context),
        )  # fmt: skip
        v, o = result.voxels, result.objects
        reply = postprocess_pb2.EvaluateResponse(
            precision=v.precision, recall=v.recall, f1=v.f1, jaccard=v.jaccard,
            true_positives=v.true_positives, false_positives=v.false_positives,
            false_negatives=v.false_negatives, true_negatives=v.true_negatives,
        )  # fmt: skip
        if o is not None:
            reply.object_true_positives = o.true_positives
            reply.object_false_positives = o.false_positives
            reply.object_false_negatives = o.false_negatives
            reply.object_precision = o.precision
            reply.object_recall = o.recall
            reply.object_f1 = o.f1
        reply.overlays.extend(result.overlays)
        return reply

    def BuildPyramid(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.volume.array:
            raise InvalidArgumentError(
                "a pyramid is built from the volume's full-resolution array; leave array empty",
                field="volume.array",
            )
        store, key = self._resolve(request.volume, "volume")
        with _naming("volume"):
            store.open_volume(key)  # refuse incomplete volumes before writing anything
            arrays = build_pyramid(
                store,
                key,
                int(request.levels),
                max_workers=self.max_workers,
                cancelled=_cancelled_with(context),
            )
        return postprocess_pb2.BuildPyramidResponse(arrays=arrays)

    def _destination(self, destination: str, *, overwrite: bool, field: str = "destination") -> str:
        """Where an export may write: under a root, never over the service's own
        documents, and over an existing file or folder only with ``overwrite``."""
        destination = destination.strip()
        if not destination:
            raise InvalidArgumentError(f"{field} is empty", field=field)
        store = self.roots.store()
        if "://" not in destination and not destination.startswith(("/", "~")):
            # A relative destination is a place in the default store, never the cwd.
            try:
                url = store.key_url(check_key(destination))
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(exc.message, field=field) from None
        elif "://" in destination or self.restrict_local:
            url = self.roots.check_url(destination, field=field)
        else:  # an operator widened local paths (DEEP3M_RESTRICT_LOCAL_INPUTS=false)
            with _naming(field):
                url = normalize_url(f"file://{destination}")
        inside = url.removeprefix(store.url.rstrip("/") + "/")
        if inside != url and inside.split("/", 1)[0] in RESERVED_PREFIXES:
            raise InvalidArgumentError(
                f"{field} {clip(destination)} lies in the store's reserved "
                f"{inside.split('/', 1)[0]}/ folder",
                field=field,
            )
        if not overwrite:
            refuse_existing(url, storage_options=self._storage_options(url), field=field)
        return url

    def _storage_options(self, destination: str) -> dict[str, Any] | None:
        return dict(self.roots.storage_options) if destination.startswith("s3://") else None

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        fmt = request.format.lower()
        if fmt not in FORMATS:
            raise InvalidArgumentError(
                f"format must be one of {', '.join(FORMATS)}, got {request.format!r}",
                field="format",
            )
        destination = self._destination(request.destination, overwrite=request.overwrite)
        options = self._storage_options(destination)
        if fmt == "overlay":
            if not request.image.path:
                raise InvalidArgumentError("an overlay needs image.path", field="image.path")
            overlay, attrs = self._open(request.volume, "volume")
            image, _ = self._open(request.image, "image")
            files = export_overlay(
                image, overlay, destination, kind=volume_kind(overlay.dtype, attrs),
                slices=list(request.slices), storage_options=options,
            )  # fmt: skip
        else:
            store, key = self._resolve(request.volume, "volume")
            with _naming("volume"):
                files = export_volume(
                    store,
                    key,
                    destination,
                    fmt,
                    array=request.volume.array,
                    storage_options=options,
                )
        return postprocess_pb2.ExportResponse(files=files)
