"""Ingest an image stack into an OME-Zarr volume, in parallel by z-range.

The volume is created incomplete, every z-range is written by one task (ranges
are aligned to the chunk, or shard, z-size, so each range owns whole chunks and
a retried range rewrites the same bytes), and only then is it marked complete.
``ingest`` runs all of it in this process and deletes the partial volume on any
failure or interruption; the scheduler's ingest job runs the same pieces as
tasks: ``plan_ingest`` + ``create_ingest_volume`` when the job is planned,
``ingest_range`` per task, ``finalize_ingest`` last.

Modules: ``plan`` (the validated layout and z-ranges), ``volume`` (the pieces a
job runs: create, write a range, finalize), ``local`` (all of it in this
process, with progress events).
"""

from deep3m.core.ingest.local import IngestResult, ingest
from deep3m.core.ingest.plan import IngestPlan, plan_ingest, z_ranges
from deep3m.core.ingest.volume import (
    create_ingest_volume,
    finalize_ingest,
    gather_levels,
    ingest_range,
)

__all__ = [
    "IngestPlan",
    "IngestResult",
    "create_ingest_volume",
    "finalize_ingest",
    "gather_levels",
    "ingest",
    "ingest_range",
    "plan_ingest",
    "z_ranges",
]
