"""gRPC servicer of the training role: TrainMember (streamed), GetModel, ListModels.

``TrainMember`` checks the inputs before answering (bad input → the RPC's
status, nothing written), then trains in a background thread and streams its
ProgressEvents; a client that goes away cancels the training (which stops at
its next iteration, leaving a snapshot to resume from).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

import grpc

from deep3m.core.errors import Deep3mError, InvalidArgumentError
from deep3m.core.events import ProgressEvent
from deep3m.core.locations import StoreRoots
from deep3m.models.card import ModelCard, card_key, load_card
from deep3m.runtime.progress_proto import event_to_proto
from deep3m.runtime.settings import Settings
from deep3m.training.adaptation.member import adapt_member
from deep3m.training.config import TrainConfig
from deep3m.training.trainer import MemberResult, pick_device, train_member
from deep3m.training.validate import check_training_inputs
from deep3m.v1 import common_pb2, training_pb2, training_pb2_grpc

log = logging.getLogger("deep3m.training")

SERVICE_NAME: str = training_pb2.DESCRIPTOR.services_by_name["Training"].full_name


def card_to_proto(card: ModelCard) -> training_pb2.ModelCard:
    import json

    return training_pb2.ModelCard(
        id=card.id,
        architecture=card.architecture,
        width=card.width,
        members=list(card.member_names),
        card_json=json.dumps(card.to_json(), sort_keys=True),
    )


class TrainingServicer(training_pb2_grpc.TrainingServicer):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.roots = StoreRoots.from_settings(settings)

    def TrainMember(
        self, request: training_pb2.TrainMemberRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.ProgressEvent]:
        config = TrainConfig.from_spec(request.spec)
        member = request.member
        if member not in config.members:
            raise InvalidArgumentError(
                f"member {member!r} is not one of the spec's members {list(config.members)}",
                field="member",
            )
        store = self.roots.store("")
        check_training_inputs(config, store, roots=self.roots)
        events: queue.Queue[ProgressEvent | BaseException | MemberResult] = queue.Queue()
        cancelled = threading.Event()
        context.add_callback(cancelled.set)
        device = pick_device(None if self.settings.device == "auto" else self.settings.device)

        def run() -> None:
            try:
                if config.adapting:
                    events.put(
                        adapt_member(
                            config,
                            member,
                            store,
                            roots=self.roots,
                            observer=events.put,
                            cancelled=cancelled,
                            device=device,
                        )
                    )
                    return
                events.put(
                    train_member(
                        config,
                        member,
                        store,
                        observer=events.put,
                        cancelled=cancelled,
                        device=device,
                        roots=self.roots,
                    )
                )
            except BaseException as exc:  # handed to the RPC thread, which raises it
                events.put(exc)

        worker = threading.Thread(target=run, name=f"train-{config.model_id}-{member}", daemon=True)
        worker.start()
        try:
            while True:
                item = events.get()
                if isinstance(item, ProgressEvent):
                    yield event_to_proto(item)
                elif isinstance(item, MemberResult):
                    yield event_to_proto(
                        ProgressEvent(
                            job_id=config.model_id,
                            state="SUCCEEDED",
                            stage="train",
                            task_id=member,
                            message=f"{member} trained: {item.iterations} iterations",
                            metrics={"iteration": float(item.iterations), **item.metrics},
                        )
                    )
                    return
                else:
                    if isinstance(item, Deep3mError | Exception):
                        raise item
                    raise RuntimeError("training thread ended abnormally") from item
        finally:
            cancelled.set()

    def GetModel(
        self, request: training_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> training_pb2.ModelCard:
        store = self.roots.store(request.store_url)
        return card_to_proto(load_card(store, request.model))

    def ListModels(
        self, request: training_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> training_pb2.ListModelsResponse:
        store = self.roots.store(request.store_url)
        cards = []
        for name in store.list("models"):
            try:
                if store.exists(card_key(name)):
                    cards.append(card_to_proto(load_card(store, name)))
            except Deep3mError as exc:  # one broken card must not hide the others
                log.warning(
                    "skipping unreadable model card", extra={"model": name, "error": exc.message}
                )
        return training_pb2.ListModelsResponse(models=cards)
