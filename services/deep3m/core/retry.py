"""One backoff policy for every retry loop: exponential, capped, with jitter.

Callers own the waiting (``threading.Event.wait`` so a stop request interrupts
it); this module only says how long. Jitter spreads a fleet of workers that lost
the scheduler at the same moment so they do not reconnect in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


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
