"""One backoff policy for every retry loop: exponential, capped, with jitter.

Callers own the waiting (``threading.Event.wait`` so a stop request interrupts
it); this module only says how long. Jitter spreads a fleet of workers that lost
the scheduler at the same moment so they do not reconnect in lockstep.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass
class Backoff:
    """Delays ``initial_s · factor^n``, capped at ``max_s``, each scaled by ±``jitter``.

    ``next_delay()`` advances; ``reset()`` returns to the first delay after a success.
    """

    initial_s: float = 0.1
    max_s: float = 2.0
    factor: float = 2.0
    jitter: float = 0.0
    attempt: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (self.initial_s > 0 and self.max_s >= self.initial_s):
            raise ValueError(
                f"backoff needs 0 < initial_s <= max_s, got {self.initial_s}, {self.max_s}"
            )
        if self.factor < 1 or not 0 <= self.jitter < 1:
            raise ValueError(
                f"backoff needs factor >= 1 and 0 <= jitter < 1, got {self.factor}, {self.jitter}"
            )

    def peek(self) -> float:
        """The next delay without advancing (no jitter)."""
        return min(self.initial_s * self.factor**self.attempt, self.max_s)

    def next_delay(self) -> float:
        delay = self.peek()
        self.attempt += 1
        if self.jitter:
            delay *= 1 + self._rng.uniform(-self.jitter, self.jitter)
        return delay

    def reset(self) -> None:
        self.attempt = 0


def retry_while(
    call: Callable[[], T],
    transient: Callable[[BaseException], bool],
    *,
    budget_s: float,
    backoff: Backoff | None = None,
    wait: Callable[[float], bool] | None = None,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """``call()``, again after each ``transient`` error until ``budget_s`` has passed.

    ``wait(delay)`` waits between tries (``Event.wait``: returning True gives up at
    once, e.g. on a stop request); the last error is raised when giving up.
    ``on_retry(error, delay)`` hears each retry (to log the first, say).
    """
    policy = backoff or Backoff(0.2, 5.0, jitter=0.2)
    pause = wait or threading.Event().wait
    give_up = time.monotonic() + max(budget_s, 0.0)
    while True:
        try:
            return call()
        except Exception as exc:
            delay = policy.next_delay()
            if not transient(exc) or time.monotonic() + delay > give_up:
                raise
            if on_retry is not None:
                on_retry(exc, delay)
            if pause(delay):
                raise
