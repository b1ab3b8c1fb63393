"""``memory://``: fsspec's in-process filesystem, shared by every store of one process (tests)."""

from __future__ import annotations

from deep3m.core.store.base import Store


class MemoryStore(Store, scheme="memory"):
    """Every behaviour is the fsspec default: writes are whole, there are no directories."""
