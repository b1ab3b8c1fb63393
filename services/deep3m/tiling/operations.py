"""What the tiling role does, as plain functions over settings (no gRPC here).

Every volume reference is resolved through the configured store roots, so a
request cannot make the service read or write outside them; local source paths
are checked the same way when ``restrict_local_inputs`` is set.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from deep3m.core.errors import AlreadyExistsError, InvalidArgumentError
from deep3m.core.geometry import Block, BlockPlan, plan_blocks
from deep3m.core.ingest import IngestResult, ingest
from deep3m.core.locations import StoreRoots
from deep3m.core.stats import DEFAULT_HISTOGRAM_BINS, VolumeStatistics, compute_statistics
from deep3m.core.store import Store, VolumeInfo
from deep3m.runtime.settings import Settings

DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10000


def check_source(
    source: str, roots: StoreRoots, *, restrict_local: bool, field: str = "spec.source"
) -> str:
    """The source, refused when it lies outside the store roots.

    URLs (``s3://``, ``file://``, ``memory://``) must always lie under a root;
    local paths only when ``restrict_local``.
    """
    return roots.check_source(source, restrict_local=restrict_local, field=field)


def ingest_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class VolumeDescription:
    store_url: str
    path: str
    array: str
    info: VolumeInfo
    statistics: VolumeStatistics


@dataclass(frozen=True)
class BlockPage:
    blocks: tuple[Block, ...]
    total_blocks: int
    grid_shape: tuple[int, ...]
    next_page_token: str


class TilingOperations:
    """Ingest, describe and block planning against the configured stores."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.roots = StoreRoots.from_settings(settings)

    def check_source(self, source: str, field: str = "spec.source") -> str:
        return check_source(
            source, self.roots, restrict_local=self.settings.restrict_local_inputs, field=field
        )

    def ingest(
        self,
        source: str,
        store_url: str,
        path: str,
        *,
        voxel_size_nm: Sequence[float] = (),
        chunk_shape: Sequence[int] = (),
        shard_shape: Sequence[int] = (),
        slices_per_task: int = 0,
        overwrite: bool = False,
        cancelled: threading.Event | None = None,
    ) -> tuple[Store, IngestResult]:
        source = self.check_source(source)
        store, key = self.roots.resolve(store_url, path, field="spec.output")
        if not overwrite and store.exists(key):
            # Checked before reading any image so a typo costs nothing.
            raise AlreadyExistsError(
                f"{store.key_url(key)} already exists", field="spec.output.path"
            )
        options = self.settings.storage_options()
        result = ingest(
            source,
            store,
            key,
            voxel_size_nm=list(voxel_size_nm) or None,
            chunk_shape=list(chunk_shape) or None,
            shard_shape=list(shard_shape) or None,
            slices_per_task=slices_per_task,
            workers=ingest_workers(),
            overwrite=overwrite,
            cancelled=cancelled,
            storage_options=options,
        )
        return store, result

    def describe(
        self, store_url: str, path: str, array: str = "", histogram_bins: int = 0
    ) -> VolumeDescription:
        if histogram_bins < 0:
            raise InvalidArgumentError(
                f"histogram_bins must be >= 0, got {histogram_bins}", field="histogram_bins"
            )
        store, key = self.roots.resolve(store_url, path, field="volume")
        info = store.volume_info(key, array)
        data = store.open_volume(key, array)
        stats = compute_statistics(
            data, bins=histogram_bins or DEFAULT_HISTOGRAM_BINS, workers=ingest_workers()
        )
        return VolumeDescription(store.url, key, array, info, stats)

    def plan_blocks(
        self,
        store_url: str,
        path: str,
        array: str = "",
        *,
        block_shape: Sequence[int] = (),
        halo: Sequence[int] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> BlockPage:
        store, key = self.roots.resolve(store_url, path, field="volume")
        info = store.volume_info(key, array)
        grid = info.shard_shape or info.chunk_shape
        plan = plan_blocks(info.shape, list(block_shape) or grid, list(halo) or None, grid=grid)
        return page_of(plan, f"{store.key_url(key)}/{array}", page_size, page_token)


def _fingerprint(plan: BlockPlan, volume: str) -> str:
    text = f"{volume}|{plan.volume_shape}|{plan.block_shape}|{plan.halo}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def page_of(plan: BlockPlan, volume: str, page_size: int, page_token: str) -> BlockPage:
    """One page of blocks (C order). Tokens are bound to the plan they came from."""
    if page_size < 0:
        raise InvalidArgumentError(f"page_size must be >= 0, got {page_size}", field="page_size")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    total = len(plan)
    fingerprint = _fingerprint(plan, volume)
    offset = 0
    if page_token:
        offset_text, _, token_print = page_token.partition(".")
        if token_print != fingerprint or not offset_text.isdigit() or int(offset_text) > total:
            raise InvalidArgumentError(
                f"page_token {page_token!r} does not belong to this block plan (same volume, "
                "block_shape and halo) or is damaged",
                field="page_token",
            )
        offset = int(offset_text)
    stop = min(offset + size, total)
    blocks = tuple(plan.block(n) for n in range(offset, stop))
    token = f"{stop}.{fingerprint}" if stop < total else ""
    return BlockPage(blocks, total, plan.grid_shape, token)
