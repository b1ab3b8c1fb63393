"""Prometheus metrics, all prefixed ``deep3m_``; no per-job or per-block labels."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

TASKS_PENDING = Gauge("deep3m_tasks_pending", "Tasks waiting for a worker", ["role"])
TASKS_LEASED = Gauge("deep3m_tasks_leased", "Tasks leased to workers", ["role"])
TASKS_COMPLETED = Counter("deep3m_tasks_completed_total", "Tasks completed", ["role"])
TASK_RETRIES = Counter("deep3m_task_retries_total", "Task attempts that failed and were retried",
                       ["role"])
TASKS_QUARANTINED = Counter("deep3m_tasks_quarantined_total",
                            "Tasks given up after repeated failures", ["role"])
LEASES_EXPIRED = Counter("deep3m_leases_expired_total", "Leases that ran out and were re-queued",
                         ["role"])
TASK_SECONDS = Histogram(
    "deep3m_task_duration_seconds", "Lease-to-completion time of tasks", ["role"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
)
VOXELS_PROCESSED = Counter("deep3m_voxels_processed_total", "Voxels written by workers", ["role"])
JOBS = Gauge("deep3m_jobs", "Jobs by state", ["state"])
INGEST_BYTES = Counter("deep3m_ingest_bytes_total", "Bytes written by ingest")
TRAINING_ITERATIONS = Counter("deep3m_training_iterations_total", "Training iterations run")


def start_metrics_server(port: int, host: str = "0.0.0.0") -> None:
    start_http_server(port, addr=host)
