"""Scale worker Deployments on queue depth, without KEDA.

``decide`` is the policy, a pure function: scale up at once to what the queue
needs, scale down (to zero included) only after the need has stayed lower for
the whole cool-down, and never below the replicas needed by tasks already
leased, so busy workers are not taken away. ``Autoscaler`` runs it in a thread:
every interval it reads the queue, reads each Deployment's ``scale``
subresource, and patches ``spec.replicas`` when the decision differs. The
chart grants it ``get``/``patch`` on ``deployments/scale`` of the named worker
Deployments only.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from deep3m.core.errors import FailedPreconditionError, InvalidArgumentError
from deep3m.runtime.settings import Settings

log = logging.getLogger("deep3m.autoscaler")

_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class ScalePolicy:
    """How one role's Deployment follows its queue."""

    max_replicas: int
    tasks_per_replica: int = 8
    cooldown_seconds: float = 300.0
    # Tasks one replica leases at a time (DEEP3M_WORKER_CAPACITY of the workers).
    worker_capacity: int = 1
    min_replicas: int = 0

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < self.min_replicas:
            raise InvalidArgumentError(
                f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas} and "
                f"{self.max_replicas}",
                field="max_replicas",
            )
        if self.tasks_per_replica < 1:
            raise InvalidArgumentError(
                f"tasks_per_replica must be >= 1, got {self.tasks_per_replica}",
                field="tasks_per_replica",
            )
        if self.worker_capacity < 1:
            raise InvalidArgumentError(
                f"worker_capacity must be >= 1, got {self.worker_capacity}",
                field="worker_capacity",
            )
        if self.cooldown_seconds < 0:
            raise InvalidArgumentError(
                f"cooldown_seconds must be >= 0, got {self.cooldown_seconds}",
                field="cooldown_seconds",
            )


@dataclass(frozen=True)
class ScaleStep:
    """A decision: the replicas to run, and since when the current count was last needed."""

    replicas: int
    needed_at: float | None


def needed_replicas(pending: int, leased: int, policy: ScalePolicy) -> int:
    """Replicas the queue asks for, within the policy's bounds."""
    if pending < 0 or leased < 0:
        raise InvalidArgumentError(
            f"task counts must be >= 0, got pending={pending}, leased={leased}", field="pending"
        )
    wanted = max(
        math.ceil(pending / policy.tasks_per_replica),
        math.ceil(leased / policy.worker_capacity),
    )
    return min(max(wanted, policy.min_replicas), policy.max_replicas)


def decide(
    *,
    pending: int,
    leased: int,
    current: int,
    policy: ScalePolicy,
    needed_at: float | None,
    now: float,
) -> ScaleStep:
    """The replicas to run now.

    ``needed_at`` is the last time at least ``current`` replicas were needed
    (``None`` when unknown, e.g. after a restart: the cool-down then starts
    now). Scale-ups and cuts to ``max_replicas`` apply at once; any other
    scale-down waits until ``now - needed_at >= cooldown_seconds``.
    """
    target = needed_replicas(pending, leased, policy)
    capped = min(current, policy.max_replicas)
    if target >= capped:
        return ScaleStep(target, now)
    if needed_at is None:
        return ScaleStep(capped, now)
    if now - needed_at >= policy.cooldown_seconds:
        return ScaleStep(target, now)
    return ScaleStep(capped, needed_at)


class ScaleApi(Protocol):
    """The two calls the autoscaler makes on the Kubernetes API."""

    def get_replicas(self, namespace: str, deployment: str) -> int: ...

    def set_replicas(self, namespace: str, deployment: str, replicas: int) -> None: ...


class KubernetesScaleApi:
    """``apps/v1`` Deployment ``scale`` subresource through the ``kubernetes`` client."""

    def __init__(self, api_client: Any | None = None) -> None:
        from kubernetes import client, config

        if api_client is None:
            # Inside the pod: the ServiceAccount token the chart mounts for the scheduler.
            try:
                config.load_incluster_config()
            except config.ConfigException as exc:
                raise FailedPreconditionError(
                    f"autoscaling needs the in-cluster Kubernetes API ({exc}); run the "
                    "scheduler in a pod with a ServiceAccount token, or turn "
                    "DEEP3M_AUTOSCALE_ENABLED off",
                    field="autoscale_enabled",
                ) from None
            api_client = client.ApiClient()
        self._apps = client.AppsV1Api(api_client)

    def get_replicas(self, namespace: str, deployment: str) -> int:
        scale = self._apps.read_namespaced_deployment_scale(deployment, namespace)
        return int(scale.spec.replicas or 0) if scale.spec is not None else 0

    def set_replicas(self, namespace: str, deployment: str, replicas: int) -> None:
        # A JSON merge patch touches spec.replicas only, whatever else the object holds.
        self._apps.patch_namespaced_deployment_scale(
            deployment,
            namespace,
            {"spec": {"replicas": replicas}},
            _content_type="application/merge-patch+json",
        )


def policies_from_settings(settings: Settings) -> dict[str, tuple[str, ScalePolicy]]:
    """``{role: (deployment name, policy)}`` from the ``DEEP3M_AUTOSCALE_*`` settings."""
    field = "autoscale_deployments"
    deployments = settings.autoscale_deployments
    if not deployments:
        raise InvalidArgumentError(
            "autoscale_enabled needs DEEP3M_AUTOSCALE_DEPLOYMENTS, e.g. "
            "'inference=rel-deep3m-inference,training=rel-deep3m-training'",
            field=field,
        )
    maxima = settings.autoscale_max_replicas_by_role
    per_replica = settings.autoscale_tasks_per_replica_by_role
    for name, extra in (("max_replicas", maxima), ("tasks_per_replica", per_replica)):
        unknown = sorted(set(extra) - set(deployments))
        if unknown:
            raise InvalidArgumentError(
                f"autoscale_{name}_by_role names {', '.join(unknown)}, which "
                "autoscale_deployments does not list",
                field=f"autoscale_{name}_by_role",
            )
    return {
        role: (
            deployment,
            ScalePolicy(
                max_replicas=maxima.get(role, settings.autoscale_max_replicas),
                tasks_per_replica=per_replica.get(role, settings.autoscale_tasks_per_replica),
                cooldown_seconds=settings.autoscale_cooldown_seconds,
                worker_capacity=settings.worker_capacity,
            ),
        )
        for role, deployment in deployments.items()
    }


def _pod_namespace() -> str:
    try:
        return _NAMESPACE_FILE.read_text().strip()
    except OSError:
        return ""


class Autoscaler:
    """Keeps worker Deployments sized to the queue, from a background thread.

    ``pending_by_role()`` and ``leased_by_role()`` return task counts per role
    (roles absent count as zero). Errors from the Kubernetes API are logged and
    counted, never raised: the scheduler keeps serving, and the next round
    tries again.
    """

    def __init__(
        self,
        pending_by_role: Callable[[], Mapping[str, int]],
        *,
        namespace: str,
        targets: Mapping[str, tuple[str, ScalePolicy]],
        api: ScaleApi,
        leased_by_role: Callable[[], Mapping[str, int]] | None = None,
        interval_seconds: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not namespace:
            raise InvalidArgumentError(
                "the autoscaler needs a namespace (DEEP3M_AUTOSCALE_NAMESPACE)",
                field="autoscale_namespace",
            )
        if interval_seconds <= 0:
            raise InvalidArgumentError(
                f"interval_seconds must be > 0, got {interval_seconds}",
                field="autoscale_interval_seconds",
            )
        self._pending = pending_by_role
        self._leased = leased_by_role or (lambda: {})
        self._namespace = namespace
        self._targets = dict(targets)
        self._api = api
        self._interval = interval_seconds
        self._clock = clock
        self._needed_at: dict[str, float | None] = dict.fromkeys(self._targets)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rounds = 0
        self._round_done = threading.Condition()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        pending_by_role: Callable[[], Mapping[str, int]],
        *,
        leased_by_role: Callable[[], Mapping[str, int]] | None = None,
        api: ScaleApi | None = None,
    ) -> Autoscaler:
        """Configured from ``DEEP3M_AUTOSCALE_*``; talks to the in-cluster API by default."""
        namespace = settings.autoscale_namespace or _pod_namespace()
        targets = policies_from_settings(settings)
        return cls(
            pending_by_role,
            namespace=namespace,
            targets=targets,
            api=api if api is not None else KubernetesScaleApi(),
            leased_by_role=leased_by_role,
            interval_seconds=settings.autoscale_interval_seconds,
        )

    @property
    def rounds(self) -> int:
        """Completed rounds (for waiting on progress)."""
        with self._round_done:
            return self._rounds

    def wait_rounds(self, count: int, timeout: float) -> bool:
        """Block until ``count`` rounds have completed in total; False on timeout."""
        with self._round_done:
            return self._round_done.wait_for(lambda: self._rounds >= count, timeout)

    def run_once(self) -> dict[str, int]:
        """One round over every role; returns the replicas each Deployment now has."""
        from deep3m.runtime.metrics import AUTOSCALER_ERRORS, AUTOSCALER_REPLICAS

        pending, leased = self._pending(), self._leased()
        now = self._clock()
        result: dict[str, int] = {}
        for role, (deployment, policy) in self._targets.items():
            try:
                current = self._api.get_replicas(self._namespace, deployment)
                step = decide(
                    pending=int(pending.get(role, 0)),
                    leased=int(leased.get(role, 0)),
                    current=current,
                    policy=policy,
                    needed_at=self._needed_at[role],
                    now=now,
                )
                if step.replicas != current:
                    self._api.set_replicas(self._namespace, deployment, step.replicas)
                    log.info(
                        "scaled %s from %d to %d replicas",
                        deployment,
                        current,
                        step.replicas,
                        extra={"role": role, "deployment": deployment},
                    )
                self._needed_at[role] = step.needed_at
                result[role] = step.replicas
                AUTOSCALER_REPLICAS.labels(role=role).set(step.replicas)
            except Exception:
                # One role's failure (RBAC, API outage) must not stop the others or the thread.
                AUTOSCALER_ERRORS.labels(role=role).inc()
                log.exception(
                    "cannot scale %s", deployment, extra={"role": role, "deployment": deployment}
                )
        with self._round_done:
            self._rounds += 1
            self._round_done.notify_all()
        return result

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # the queue callables belong to the scheduler; keep going
                log.exception("autoscaler round failed")
            self._stop.wait(self._interval)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="autoscaler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
