"""Completions from a worker's task threads share ``CompleteTasks`` calls.

Whoever finds no call in flight sends everything waiting, up to a limit; there
is no timer, so a lone completion goes at once and a burst goes in few calls
(one call, one store write, for many tasks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from deep3m.core.errors import Deep3mError
from deep3m.runtime.scheduler_client import Completion

MAX_COMPLETIONS_PER_CALL = 256


@dataclass
class _Pending:
    completion: Completion
    done: bool = False
    error: BaseException | None = None


class CompletionBatcher:
    """Completions from many threads share calls (see the module docstring)."""

    def __init__(
        self,
        send: Callable[[Sequence[Completion]], Sequence[Deep3mError | None]],
        limit: int = MAX_COMPLETIONS_PER_CALL,
    ) -> None:
        self._send = send
        self._limit = limit
        self._changed = threading.Condition()
        self._waiting: list[_Pending] = []
        self._sending = False

    def complete(self, completion: Completion) -> None:
        """Returns once recorded; raises the error of this completion (or of the call)."""
        item = _Pending(completion)
        with self._changed:
            self._waiting.append(item)
            while not item.done:
                if self._sending:
                    self._changed.wait()
                    continue
                self._sending = True
                batch, self._waiting = self._waiting[: self._limit], self._waiting[self._limit :]
                self._changed.release()
                try:
                    self._deliver(batch)
                finally:
                    self._changed.acquire()
                    self._sending = False
                    self._changed.notify_all()
        if item.error is not None:
            raise item.error

    def _deliver(self, batch: list[_Pending]) -> None:
        try:
            errors: Sequence[BaseException | None] = self._send([p.completion for p in batch])
        except Exception as exc:  # the call failed: the same error for every completion
            errors = [exc] * len(batch)
        for pending, error in zip(batch, errors, strict=True):
            pending.error = error
            pending.done = True
