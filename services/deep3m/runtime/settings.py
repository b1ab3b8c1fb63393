"""One typed settings object for every role, read from ``DEEP3M_*`` variables."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Role = Literal["scheduler", "tiling", "training", "inference", "postprocess"]
ROLES: tuple[Role, ...] = ("scheduler", "tiling", "training", "inference", "postprocess")

# Loopback ports of the embedded deployment (`deep3m up`); on Kubernetes every
# role listens on DEEP3M_GRPC_PORT (50051) in its own pod.
DEFAULT_PORTS: dict[str, int] = {
    "scheduler": 50051,
    "tiling": 50052,
    "training": 50053,
    "inference": 50054,
    "postprocess": 50055,
}


class Settings(BaseSettings):
    """Settings shared by all roles. Environment: ``DEEP3M_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="DEEP3M_", extra="forbid", frozen=True)

    # Store
    store_url: str = "file://./deep3m-data"
    # Extra URL prefixes (besides store_url) that inputs may be read from;
    # comma-separated. Local paths are allowed unless restrict_local_inputs.
    input_roots: str = ""
    restrict_local_inputs: bool = False
    s3_endpoint_url: str = ""
    s3_region: str = ""
    # Empty: the standard AWS credential chain (env, profile, IRSA, Pod Identity).
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""

    # Network
    host: str = "0.0.0.0"
    grpc_port: int = Field(default=0, ge=0, le=65535)  # 0: the role's default port
    metrics_port: int = Field(default=9090, ge=0, le=65535)  # 0: no metrics endpoint
    scheduler_address: str = "127.0.0.1:50051"
    rpc_timeout_seconds: float = Field(default=30.0, gt=0)

    # Runtime
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    worker_id: str = ""

    # Scheduling
    lease_seconds: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_seconds: float = Field(default=2.0, ge=0)
    worker_capacity: int = Field(default=1, ge=1)
    poll_interval_seconds: float = Field(default=0.5, gt=0)

    # Compute
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=4, ge=1)
    max_region_voxels: int = Field(default=64 * 1024 * 1024, ge=1)

    # Autoscaling without KEDA: the scheduler scales worker Deployments itself.
    autoscale_enabled: bool = False
    autoscale_namespace: str = ""
    autoscale_deployments: str = ""  # "inference=rel-deep3m-inference,training=..."
    autoscale_max_replicas: int = Field(default=4, ge=0)
    autoscale_tasks_per_replica: int = Field(default=8, ge=1)
    autoscale_cooldown_seconds: float = Field(default=300.0, ge=0)

    def port_for(self, role: str) -> int:
        return self.grpc_port or DEFAULT_PORTS[role]

    def storage_options(self) -> dict[str, object]:
        """fsspec options for s3:// URLs (empty values fall back to the AWS chain)."""
        options: dict[str, object] = {}
        if self.s3_access_key_id:
            options["key"] = self.s3_access_key_id
            options["secret"] = self.s3_secret_access_key
        client_kwargs: dict[str, str] = {}
        if self.s3_endpoint_url:
            client_kwargs["endpoint_url"] = self.s3_endpoint_url
        if self.s3_region:
            client_kwargs["region_name"] = self.s3_region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        return options


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
