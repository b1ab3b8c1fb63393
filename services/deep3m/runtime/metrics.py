"""Prometheus metrics, all prefixed ``deep3m_``; no per-job or per-block labels."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

TASKS_PENDING = Gauge(
    "deep3m_tasks_pending",
    "Tasks a worker could lease now (tasks held in retry backoff or after a restart left out)",
    ["role"],
)
TASKS_LEASED = Gauge("deep3m_tasks_leased", "Tasks leased to workers", ["role"])
TASKS_COMPLETED = Counter("deep3m_tasks_completed_total", "Tasks completed", ["role"])
TASK_RETRIES = Counter(
    "deep3m_task_retries_total", "Task attempts that failed and were retried", ["role"]
)
TASKS_QUARANTINED = Counter(
    "deep3m_tasks_quarantined_total", "Tasks given up after repeated failures", ["role"]
)
LEASES_EXPIRED = Counter(
    "deep3m_leases_expired_total", "Leases that ran out and were re-queued", ["role"]
)
TASK_SECONDS = Histogram(
    "deep3m_task_duration_seconds",
    "Lease-to-completion time of tasks",
    ["role"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
)
VOXELS_PROCESSED = Counter("deep3m_voxels_processed_total", "Voxels written by workers", ["role"])
JOBS = Gauge("deep3m_jobs", "Jobs by state", ["state"])
INGEST_BYTES = Counter("deep3m_ingest_bytes_total", "Bytes written by ingest")
TRAINING_ITERATIONS = Counter("deep3m_training_iterations_total", "Training iterations run")

RPC_ERRORS = Counter("deep3m_rpc_errors_total", "RPCs that ended in an error status", ["code"])

AUTOSCALER_REPLICAS = Gauge(
    "deep3m_autoscaler_replicas", "Replicas the autoscaler chose per worker role", ["role"]
)
AUTOSCALER_ERRORS = Counter(
    "deep3m_autoscaler_errors_total", "Autoscaler calls to the Kubernetes API that failed", ["role"]
)

INFERENCE_PHASE_SECONDS = Histogram(
    "deep3m_inference_phase_seconds",
    "Time per predict-task phase (read, wait for the device, predict, write)",
    ["phase"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
MODEL_LOADS = Counter("deep3m_model_loads_total", "Models loaded into an inference worker")

# Every worker role's queue series exists (at 0) from the start: KEDA's
# metrics-api trigger reads them by name and errors on a missing series.
for _role in ("tiling", "training", "inference", "postprocess"):
    TASKS_PENDING.labels(role=_role)
    TASKS_LEASED.labels(role=_role)


def start_metrics_server(port: int, host: str = "0.0.0.0") -> None:
    start_http_server(port, addr=host)
