"""Loaded models and the devices they run on, shared by tasks and interactive requests.

Multi-GPU pods run one task thread per GPU rather than ``DataParallel``: blocks
are independent, so whole tasks on separate GPUs scale without splitting
small batches or replicating the model on every forward pass. ``DevicePool``
hands each task the least busy device; ``ModelCache`` keeps one copy of each
model per device.

Pipelining: a worker holds more blocks than its devices compute at once, so
while one block computes the next one is read and the previous one written.
``DevicePool.compute`` is the gate between them: at most ``slots`` computations
per device at a time, admitted first come first served, so reads and writes of
the other blocks overlap compute without ever adding a second computation.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from deep3m.core.errors import CancelledError, InvalidArgumentError
from deep3m.core.store import Store
from deep3m.models.card import ModelCard, load_card, load_member
from deep3m.runtime.metrics import MODEL_LOADS
from deep3m.runtime.task import StopFlag

MemberLoader = Callable[[Store, ModelCard, str, torch.device], nn.Module]


def resolve_members(card: ModelCard, requested: Sequence[str]) -> tuple[str, ...]:
    """The members to run: all in the card when none are requested; each must exist."""
    if not requested:
        return card.member_names
    names = tuple(dict.fromkeys(str(m) for m in requested))
    for name in names:
        card.member(name)  # raises InvalidArgumentError naming the member
    return names


@dataclass(frozen=True)
class LoadedModel:
    card: ModelCard
    members: Mapping[str, nn.Module]
    device: torch.device


class ModelCache:
    """Models by (store, model id, members, device); least recently used dropped first.

    The card is re-read on every lookup (one small document), so a model saved
    again under the same id is reloaded rather than served stale.
    """

    def __init__(self, loader: MemberLoader | None = None, *, capacity: int = 4) -> None:
        if capacity < 1:
            raise InvalidArgumentError(
                f"cache capacity must be >= 1, got {capacity}", field="capacity"
            )
        self._loader: MemberLoader = loader or load_member
        self._capacity = capacity
        self._entries: collections.OrderedDict[
            tuple[str, str, tuple[str, ...], str], LoadedModel
        ] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(
        self, store: Store, model_id: str, members: Sequence[str], device: torch.device
    ) -> LoadedModel:
        card = load_card(store, model_id)  # NotFoundError naming the model
        names = resolve_members(card, members)
        key = (store.url, model_id, names, str(device))
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit.card == card:
                self._entries.move_to_end(key)
                return hit
            nets = {name: self._loader(store, card, name, device).eval() for name in names}
            loaded = LoadedModel(card, nets, device)
            self.loads += 1
            MODEL_LOADS.inc()
            self._entries[key] = loaded
            self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
            return loaded

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


# How often a block waiting for its turn on a device looks at its cancellation flag.
CANCEL_CHECK_S = 0.05


class ComputeGate:
    """At most ``slots`` holders at once, admitted in arrival order (no starvation)."""

    def __init__(self, slots: int = 1) -> None:
        if isinstance(slots, bool) or slots < 1:
            raise InvalidArgumentError(f"compute slots must be >= 1, got {slots}", field="slots")
        self.slots = int(slots)
        self._changed = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()
        self._holding = 0
        self.most_holding = 0  # the highest number of holders seen at once

    @contextlib.contextmanager
    def hold(self, cancelled: StopFlag | None = None) -> Iterator[None]:
        """Wait for a slot (CancelledError if ``cancelled`` is set meanwhile), hold it."""
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            try:
                while self._holding >= self.slots or self._queue[0] is not ticket:
                    if cancelled is not None and cancelled.is_set():
                        raise CancelledError("cancelled while waiting for a device")
                    self._changed.wait(CANCEL_CHECK_S if cancelled is not None else None)
            except BaseException:
                self._queue.remove(ticket)
                self._changed.notify_all()
                raise
            self._queue.popleft()
            self._holding += 1
            self.most_holding = max(self.most_holding, self._holding)
            self._changed.notify_all()  # the next in line may fit a free slot too
        try:
            yield
        finally:
            with self._changed:
                self._holding -= 1
                self._changed.notify_all()

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._queue)


class DevicePool:
    """Hands out the least busy device (never blocks: a task holds one for its whole life,
    reads and writes included); ``compute`` admits ``slots`` computations per device."""

    def __init__(self, devices: Sequence[torch.device], *, slots: int = 1) -> None:
        if not devices:
            raise InvalidArgumentError("a device pool needs at least one device", field="device")
        self.devices = tuple(devices)
        self._busy = dict.fromkeys(range(len(self.devices)), 0)
        self._gates = tuple(ComputeGate(slots) for _ in self.devices)
        self._lock = threading.Lock()

    @property
    def slots(self) -> int:
        return self._gates[0].slots

    def gate(self, device: torch.device) -> ComputeGate:
        return self._gates[self.devices.index(device)]

    def compute(
        self, device: torch.device, cancelled: StopFlag | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Hold one of ``device``'s compute slots (first come, first served)."""
        return self.gate(device).hold(cancelled)

    @contextlib.contextmanager
    def acquire(self) -> Iterator[torch.device]:
        with self._lock:
            index = min(self._busy, key=lambda i: (self._busy[i], i))
            self._busy[index] += 1
        try:
            yield self.devices[index]
        finally:
            with self._lock:
                self._busy[index] -= 1

    def busy(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(self._busy[i] for i in range(len(self.devices)))
