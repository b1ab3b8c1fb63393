"""Resolve volume references against the configured store roots.

A reference names a store URL (or none, for the default store) and a path.
URLs outside the configured roots are refused, so a request cannot make a
service read or write arbitrary buckets or folders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.store import Store, check_key, normalize_url

# Folders of the default store that hold the services' own documents: no request
# may write into them (exports, outputs).
RESERVED_PREFIXES = frozenset({"jobs", "scheduler", "models", "healthcheck"})


@dataclass(frozen=True)
class StoreRoots:
    """The default store plus extra roots that inputs may come from."""

    default_url: str
    extra_urls: tuple[str, ...] = ()
    storage_options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_settings(cls, settings: Any) -> StoreRoots:
        return cls(
            normalize_url(settings.store_url),
            tuple(normalize_url(u) for u in settings.input_roots),
            tuple(sorted(settings.storage_options().items())),
        )

    @property
    def urls(self) -> Sequence[str]:
        return (self.default_url, *self.extra_urls)

    def check_url(self, url: str, *, field: str = "store_url") -> str:
        norm = normalize_url(url)
        for root in self.urls:
            if norm == root or norm.startswith(root.rstrip("/") + "/"):
                return norm
        raise InvalidArgumentError(
            f"{url!r} is outside the configured store roots ({', '.join(self.urls)})", field=field
        )

    def check_source(self, source: str, *, restrict_local: bool, field: str) -> str:
        """An input (path or URL) under a root; local paths may be anywhere only when
        ``restrict_local`` is off."""
        from deep3m.core.imageio import source_path

        source = source.strip()
        if not source:
            raise InvalidArgumentError(f"{field} is empty", field=field)
        if "://" in source:
            self.check_url(source_path(source), field=field)
        elif restrict_local:
            # normalize_url resolves "~", ".." and links before the comparison.
            self.check_url(f"file://{source_path(source)}", field=field)
        return source

    def store(self, url: str = "", *, field: str = "store_url") -> Store:
        """The store for ``url`` (default store when empty), checked against the roots."""
        norm = self.check_url(url or self.default_url, field=field)
        return Store(norm, dict(self.storage_options))

    def resolve(self, store_url: str, path: str, *, field: str = "volume") -> tuple[Store, str]:
        if not path:
            raise InvalidArgumentError(f"{field}.path is empty", field=f"{field}.path")
        try:
            key = check_key(path)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(exc.message, field=f"{field}.path") from exc
        return self.store(store_url, field=f"{field}.store_url"), key
