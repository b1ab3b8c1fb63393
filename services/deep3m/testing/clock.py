"""A clock tests move by hand, for code that takes a ``clock`` callable."""

from __future__ import annotations


class ManualClock:
    """Returns ``now``; tests advance it (``clock.now += 60``) instead of sleeping."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
