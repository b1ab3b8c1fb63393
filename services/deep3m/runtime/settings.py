"""One typed settings object for every role, read from ``DEEP3M_*`` variables.

Environment variables are matched case-insensitively; an empty variable means
the default (Helm templates render unset values as empty strings). A variable
that does not parse raises ``SettingsError`` naming the variable. Unknown
``DEEP3M_*`` variables are ignored, so tools sharing the prefix do not break
each other; ``unknown_env_vars`` lists them so a server can warn about typos.
Keyword arguments, in contrast, must name real fields (``extra="forbid"``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from deep3m.core.errors import InvalidArgumentError

ENV_PREFIX = "DEEP3M_"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Never echo these back in error messages.
_SECRET_FIELDS = frozenset(
    {
        "s3_access_key_id",
        "s3_secret_access_key",
        "auth_client_tokens",
        "auth_worker_tokens",
        "auth_token",
    }
)


class SettingsError(InvalidArgumentError):
    """A setting (environment variable or keyword) has a value that does not parse."""


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

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, env_ignore_empty=True
    )

    # Store
    store_url: str = "file://./deep3m-data"
    # Extra URL prefixes (besides store_url) that inputs may be read from and
    # exports written to: "s3://a,s3://b" or a JSON list. Local paths must lie under
    # one of the roots too; restrict_local_inputs=false lets an operator allow any.
    input_roots: Annotated[tuple[str, ...], NoDecode] = ()
    restrict_local_inputs: bool = True
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

    # Authentication (deep3m.runtime.auth): servers accept these bearer tokens.
    # Client tokens may submit, watch, cancel and read; a worker token of a role
    # may lease and report only that role's tasks.
    auth_enabled: bool = False
    auth_client_tokens: str = ""  # comma-separated
    auth_worker_tokens: str = ""  # "inference=TOKEN,training=TOKEN"
    # A folder of token files (a mounted Kubernetes Secret): `client`, `client-<name>`
    # hold client tokens, `worker-<role>` a worker token of that role.
    auth_token_dir: str = ""
    # The token this process presents when it calls a server (workers, CLI, client).
    auth_token: str = ""
    auth_token_file: str = ""

    # TLS on every gRPC port and channel (deep3m.runtime.channel, .server).
    tls_enabled: bool = False
    tls_cert_file: str = ""  # PEM: this process's certificate (server; client with mTLS)
    tls_key_file: str = ""
    tls_ca_file: str = ""  # PEM: CA that signs the servers' (and with mTLS, clients') certs
    tls_client_auth: bool = False  # servers require a client certificate signed by the CA
    tls_server_name: str = ""  # name to check in the server's certificate, if not the host

    # Runtime
    # Where `deep3m up` keeps its generated credentials and the record the CLI on this
    # machine finds them by; empty: $XDG_STATE_HOME/deep3m, else ~/.local/state/deep3m.
    state_dir: str = ""
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    worker_id: str = ""
    # Roles other than the scheduler pull tasks from it; off for a bare API server.
    worker_enabled: bool = True

    # Scheduling
    lease_seconds: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_seconds: float = Field(default=2.0, ge=0)
    worker_capacity: int = Field(default=1, ge=1)
    poll_interval_seconds: float = Field(default=0.5, gt=0)
    # An unreachable store (S3 outage, restart) is waited out this long, with backoff,
    # by the scheduler's writes and a worker's task, before it counts as a failure.
    store_retry_seconds: float = Field(default=120.0, ge=0)
    # Finished jobs (and their documents) are deleted this long after they end; 0 keeps them.
    finished_job_retention_days: float = Field(default=30.0, ge=0)
    # WatchJob streams served at once; each holds a thread of its own, apart from the
    # unary calls' threads, so watchers never starve health checks or leases.
    max_watch_streams: int = Field(default=128, ge=1)
    # One scheduler writes state (deep3m.scheduler.fencing): its fence lasts this long
    # unless renewed, is renewed this often (below three quarters of the TTL: the holder
    # stops writing a quarter TTL before its record expires), and a starting scheduler
    # waits this long for another holder's fence to lapse before it exits.
    fence_ttl_seconds: float = Field(default=30.0, gt=0)
    fence_renew_seconds: float = Field(default=10.0, gt=0)
    fence_wait_seconds: float = Field(default=60.0, ge=0)

    # Compute
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=4, ge=1)
    # CPU threads for torch in this process; 0 keeps torch's default (all cores).
    # Set it when several workers share one machine, as under `deep3m up`.
    torch_threads: int = Field(default=0, ge=0)
    # Blocks an inference worker holds per block it computes: with 3, the next block is
    # read and the previous one written while the current one computes.
    inference_pipeline_depth: int = Field(default=3, ge=1)
    max_region_voxels: int = Field(default=64 * 1024 * 1024, ge=1)
    # Folder of the shared sample data (cdeep3m-mito, …) the demo trains on; empty:
    # ``<repo>/../shared/data`` of an editable checkout.
    shared_data: str = ""

    # Autoscaling without KEDA: the scheduler scales worker Deployments itself.
    autoscale_enabled: bool = False
    autoscale_namespace: str = ""
    # Worker role → Deployment: "inference=rel-deep3m-inference,training=..." or a JSON object.
    autoscale_deployments: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    autoscale_max_replicas: int = Field(default=4, ge=0)
    autoscale_tasks_per_replica: int = Field(default=8, ge=1)
    autoscale_cooldown_seconds: float = Field(default=300.0, ge=0)
    autoscale_interval_seconds: float = Field(default=15.0, gt=0)
    # Per-role overrides, "inference=8,training=3" (or JSON); unlisted roles use the values above.
    autoscale_max_replicas_by_role: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict
    )
    autoscale_tasks_per_replica_by_role: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict
    )
    # Tasks one pod leases per GPU, and GPUs per pod ("inference=1,training=2");
    # unlisted roles: worker_capacity and 1.
    autoscale_worker_capacity_by_role: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict
    )
    autoscale_gpus_per_pod_by_role: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict
    )
    # Patch the Deployments' scale (off when KEDA owns the replica count).
    autoscale_set_replicas: bool = True
    # Keep controller.kubernetes.io/pod-deletion-cost on worker pods current.
    autoscale_deletion_cost: bool = False

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _settings_error(exc, given=values) from None

    @field_validator("store_url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = url.split("://", 1)[0] if "://" in url else "file"
        if scheme not in ("file", "s3", "memory"):
            raise ValueError(
                f"unsupported store URL scheme {scheme!r}; use file://, s3:// or memory://"
            )
        return url

    @field_validator("input_roots", mode="before")
    @classmethod
    def _url_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            items = json.loads(value) if value.lstrip().startswith("[") else value.split(",")
            return tuple(str(u).strip() for u in items if str(u).strip())
        return value

    @field_validator("autoscale_deployments", mode="before")
    @classmethod
    def _deployments(cls, value: Any) -> Any:
        return _role_map(value)

    @field_validator("autoscale_max_replicas_by_role", mode="before")
    @classmethod
    def _max_replicas(cls, value: Any) -> Any:
        return _role_ints(_role_map(value), minimum=0)

    @field_validator(
        "autoscale_tasks_per_replica_by_role", "autoscale_worker_capacity_by_role", mode="before"
    )
    @classmethod
    def _at_least_one_per_role(cls, value: Any) -> Any:
        return _role_ints(_role_map(value), minimum=1)

    @field_validator("autoscale_gpus_per_pod_by_role", mode="before")
    @classmethod
    def _gpus_per_pod(cls, value: Any) -> Any:
        return _role_ints(_role_map(value), minimum=0)

    @model_validator(mode="after")
    def _fence_renewed_in_time(self) -> Settings:
        if self.fence_renew_seconds >= 0.75 * self.fence_ttl_seconds:
            raise ValueError(
                f"fence_renew_seconds ({self.fence_renew_seconds}) must be below three "
                f"quarters of fence_ttl_seconds ({self.fence_ttl_seconds})"
            )
        return self

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, level: str) -> str:
        if level.upper() not in _LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(_LOG_LEVELS)}")
        return level.upper()

    def __hash__(self) -> int:
        # Frozen, so usable as a cache key; the role maps are dicts, which do not hash.
        return hash(self.model_dump_json())

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


WORKER_ROLES = tuple(r for r in ROLES if r != "scheduler")


def _role_map(value: Any) -> dict[str, Any]:
    """``"inference=a, training=b"`` (or a JSON object, or a mapping) → ``{role: value}``."""
    if isinstance(value, Mapping):
        pairs = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, str) and value.lstrip().startswith("{"):
        loaded = json.loads(value)
        if not isinstance(loaded, dict):
            raise ValueError("expected a JSON object of role: value")
        pairs = [(str(k), v) for k, v in loaded.items()]
    elif isinstance(value, str):
        pairs = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            role, sep, text = item.partition("=")
            if not sep or not text.strip():
                raise ValueError(f"{item!r} is not role=value")
            pairs.append((role.strip(), text.strip()))
    else:
        raise ValueError(f"expected role=value pairs, got {value!r}")
    result: dict[str, Any] = {}
    for role, item in pairs:
        if role not in WORKER_ROLES:
            raise ValueError(f"unknown worker role {role!r}; use one of {', '.join(WORKER_ROLES)}")
        if role in result:
            raise ValueError(f"role {role!r} given twice")
        result[role] = item
    return result


def _role_ints(values: Mapping[str, Any], *, minimum: int) -> dict[str, int]:
    numbers: dict[str, int] = {}
    for role, raw in values.items():
        try:
            number = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{role}={raw!r} is not an integer") from None
        if number < minimum:
            raise ValueError(f"{role}={number} must be >= {minimum}")
        numbers[role] = number
    return numbers


def env_var(field_name: str) -> str:
    """The environment variable that sets ``field_name``."""
    return ENV_PREFIX + field_name.upper()


def _settings_error(exc: ValidationError, *, given: Mapping[str, Any]) -> SettingsError:
    problems: list[str] = []
    names: list[str] = []
    for err in exc.errors():
        loc = str(err["loc"][0]) if err["loc"] else ""
        # Values passed as keywords are named as fields; the rest came from the environment.
        name = loc if loc in given else env_var(loc)
        value = "" if loc in _SECRET_FIELDS else f"={err.get('input')!r}"
        message = (
            "not a setting"
            if err["type"] == "extra_forbidden"
            else str(err["msg"]).removeprefix("Value error, ")
        )
        if not loc:  # a rule across fields: its message names them
            problems.append(message)
            continue
        problems.append(f"{name}{value}: {message}")
        names.append(name)
    return SettingsError("invalid setting " + "; ".join(problems), field=names[0] if names else "")


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[str]:
    """``DEEP3M_*`` variables that set no field (likely typos); sorted."""
    env = os.environ if environ is None else environ
    known = {env_var(name) for name in Settings.model_fields}
    return sorted(k for k in env if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def warn_unknown_env_vars(logger: logging.Logger, environ: Mapping[str, str] | None = None) -> None:
    unknown = unknown_env_vars(environ)
    if unknown:
        logger.warning(
            "ignoring unknown settings variables: %s",
            ", ".join(unknown),
            extra={"variables": unknown},
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
