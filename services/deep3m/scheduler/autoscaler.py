"""Scale worker Deployments on queue depth, without KEDA, and keep busy pods alive.

``decide`` is the policy, a pure function: scale up at once to what the queue
needs; scale down (to zero included) only to the highest need seen over the
stabilisation window (``cooldown_seconds``), so a queue that empties for a
moment does not drop 4 → 0 and pay a GPU cold start a minute later. Never
below the pods that leased tasks need (per-role pod capacity: tasks per GPU ×
GPUs per pod), nor below the pods that hold a lease right now. Tasks held back
by retry backoff are not counted: no worker could lease them yet.

A replica-count cut lets the ReplicaSet choose which pods go. It removes pods
with the lowest ``controller.kubernetes.io/pod-deletion-cost`` first, so
``deletion_costs`` (pure) gives each pod its count of busy leases (idle pods 0)
and ``Autoscaler`` writes them before any scale-down; that works for KEDA's
scale-downs too (mode ``keda`` runs the costs only, ``set_replicas=False``).

``Autoscaler`` runs it in a thread: every interval it reads the queue (a
``RoleDemand`` per role, and the busy leases per worker pod), reads each
Deployment's ``scale`` subresource, keeps the pods' deletion costs current, and
patches ``spec.replicas`` when the decision differs. The chart grants it
``get``/``patch`` on ``deployments/scale`` of the named worker Deployments, and
``list``/``patch`` on pods when deletion costs are kept.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from deep3m.core.errors import InvalidArgumentError
from deep3m.runtime.settings import Settings
from deep3m.scheduler.kube import (
    KubernetesScaleApi,
    PodCostApi,
    ScaleApi,
    pod_namespace,
)

log = logging.getLogger("deep3m.autoscaler")


@dataclass(frozen=True)
class ScalePolicy:
    """How one role's Deployment follows its queue."""

    max_replicas: int
    tasks_per_replica: int = 8
    # The stabilisation window: scale-down goes to the highest need within it.
    cooldown_seconds: float = 300.0
    # Tasks one pod leases at a time per GPU (the chart's <role>.workerCapacity).
    worker_capacity: int = 1
    # GPUs per pod (<role>.gpu.count); 0 or 1: the pod's capacity is worker_capacity.
    gpus_per_pod: int = 1
    min_replicas: int = 0

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < self.min_replicas:
            raise InvalidArgumentError(
                f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas} and "
                f"{self.max_replicas}",
                field="max_replicas",
            )
        for name in ("tasks_per_replica", "worker_capacity"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(
                    f"{name} must be >= 1, got {getattr(self, name)}", field=name
                )
        if self.gpus_per_pod < 0:
            raise InvalidArgumentError(
                f"gpus_per_pod must be >= 0, got {self.gpus_per_pod}", field="gpus_per_pod"
            )
        if self.cooldown_seconds < 0:
            raise InvalidArgumentError(
                f"cooldown_seconds must be >= 0, got {self.cooldown_seconds}",
                field="cooldown_seconds",
            )

    @property
    def pod_capacity(self) -> int:
        """Tasks one pod leases at once (the pod's DEEP3M_WORKER_CAPACITY)."""
        return self.worker_capacity * max(1, self.gpus_per_pod)


@dataclass(frozen=True)
class RoleDemand:
    """What one role's queue asks for, as the scheduler reports it.

    ``pending`` counts every task not yet leased, ``backoff_held`` those of
    them waiting out a retry backoff (no worker can lease them yet).
    ``busy_pods``: pods holding at least one lease, when known.
    """

    pending: int = 0
    leased: int = 0
    backoff_held: int = 0
    busy_pods: int | None = None

    def __post_init__(self) -> None:
        counts = {"pending": self.pending, "leased": self.leased, "backoff_held": self.backoff_held}
        for name, value in counts.items():
            if value < 0:
                raise InvalidArgumentError(
                    f"task counts must be >= 0, got {name}={value}", field=name
                )
        if self.backoff_held > self.pending:
            raise InvalidArgumentError(
                f"backoff_held={self.backoff_held} exceeds pending={self.pending}",
                field="backoff_held",
            )
        if self.busy_pods is not None and self.busy_pods < 0:
            raise InvalidArgumentError(
                f"busy_pods must be >= 0, got {self.busy_pods}", field="busy_pods"
            )

    @property
    def leasable(self) -> int:
        return self.pending - self.backoff_held


# (time, replicas needed then), oldest first: the need over the stabilisation window.
History = tuple[tuple[float, int], ...]


@dataclass(frozen=True)
class ScaleStep:
    """A decision: the replicas to run, and the needs seen over the window so far."""

    replicas: int
    history: History


def needed_replicas(demand: RoleDemand, policy: ScalePolicy) -> int:
    """Replicas the queue asks for now, within the policy's bounds."""
    wanted = max(
        math.ceil(demand.leasable / policy.tasks_per_replica),
        math.ceil(demand.leased / policy.pod_capacity),
        demand.busy_pods or 0,
    )
    return min(max(wanted, policy.min_replicas), policy.max_replicas)


def decide(
    *,
    demand: RoleDemand,
    current: int,
    policy: ScalePolicy,
    history: History,
    now: float,
) -> ScaleStep:
    """The replicas to run now.

    ``history`` is the previous step's (empty when unknown, e.g. after a
    restart: the current count then counts as needed now, so nothing drops
    before a whole window has been seen). Scale-ups and cuts to
    ``max_replicas`` apply at once; a scale-down goes to the highest need
    within the last ``cooldown_seconds``, never below the need now.
    """
    need = needed_replicas(demand, policy)
    capped = min(current, policy.max_replicas)
    seen = history or ((now, capped),)
    window = tuple((t, n) for t, n in seen if now - t < policy.cooldown_seconds)
    window += ((now, need),)
    if need >= capped:
        return ScaleStep(need, window)
    target = min(capped, max(n for _, n in window))
    return ScaleStep(target, window)


def busy_leases(holders: Iterable[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """``{role: {worker id: leases}}`` from one ``(role, worker id)`` per active lease.

    What the scheduler's queue knows (who holds which lease) in the shape
    ``Autoscaler(busy_by_pod=...)`` reads; worker ids are pod names on Kubernetes.
    """
    out: dict[str, dict[str, int]] = {}
    for role, worker in holders:
        per_role = out.setdefault(role, {})
        per_role[worker] = per_role.get(worker, 0) + 1
    return out


def deletion_costs(pods: Mapping[str, str | None], busy: Mapping[str, int]) -> dict[str, str]:
    """The ``pod-deletion-cost`` each pod should carry, for the pods whose value differs.

    ``pods``: pod name → its current annotation (None when absent);
    ``busy``: worker id (= pod name, DEEP3M_WORKER_ID) → leases it holds.
    A pod's cost is its lease count, so idle pods (0) go first on a scale-down
    and, among busy ones, those with the least work.
    """
    wanted = {pod: str(max(0, int(busy.get(pod, 0)))) for pod in pods}
    return {pod: cost for pod, cost in wanted.items() if pods[pod] != cost}


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
    by_role: dict[str, dict[str, int]] = {}
    for name, minimum in (
        ("max_replicas", 0),
        ("tasks_per_replica", 1),
        ("worker_capacity", 1),
        ("gpus_per_pod", 0),
    ):
        setting = f"autoscale_{name}_by_role"
        by_role[name] = dict(getattr(settings, setting))
        for role, number in by_role[name].items():
            if number < minimum:
                raise InvalidArgumentError(
                    f"{setting}: {role}={number} must be >= {minimum}", field=setting
                )
        unknown = sorted(set(by_role[name]) - set(deployments))
        if unknown:
            raise InvalidArgumentError(
                f"{setting} names {', '.join(unknown)}, which autoscale_deployments does not list",
                field=setting,
            )
    return {
        role: (
            deployment,
            ScalePolicy(
                max_replicas=by_role["max_replicas"].get(role, settings.autoscale_max_replicas),
                tasks_per_replica=by_role["tasks_per_replica"].get(
                    role, settings.autoscale_tasks_per_replica
                ),
                cooldown_seconds=settings.autoscale_cooldown_seconds,
                worker_capacity=by_role["worker_capacity"].get(role, settings.worker_capacity),
                gpus_per_pod=by_role["gpus_per_pod"].get(role, 1),
            ),
        )
        for role, deployment in deployments.items()
    }


Counts = Callable[[], Mapping[str, int]]
# role → {worker id (pod name): leases it holds}
BusyByPod = Callable[[str], Mapping[str, int]]


def demand_from_counts(
    pending_by_role: Counts,
    leased_by_role: Counts | None = None,
    held_by_role: Counts | None = None,
) -> Callable[[], dict[str, RoleDemand]]:
    """A demand source from per-role count callables (roles absent count as zero)."""

    def demand() -> dict[str, RoleDemand]:
        pending = pending_by_role()
        leased = leased_by_role() if leased_by_role is not None else {}
        held = held_by_role() if held_by_role is not None else {}
        return {
            role: RoleDemand(
                pending=int(pending.get(role, 0)),
                leased=int(leased.get(role, 0)),
                backoff_held=min(int(held.get(role, 0)), int(pending.get(role, 0))),
            )
            for role in set(pending) | set(leased)
        }

    return demand


class Autoscaler:
    """Keeps worker Deployments sized to the queue, from a background thread.

    ``demand()`` returns a ``RoleDemand`` per role (roles absent: nothing
    asked). ``busy_by_pod(role)``, when given, returns the leases each worker
    pod of the role holds; with ``costs`` it drives the pods' deletion costs
    and the floor of busy pods. ``set_replicas=False`` keeps only the costs
    (KEDA owns the count). Errors from the Kubernetes API are logged and
    counted, never raised: the scheduler keeps serving, and the next round
    tries again.
    """

    def __init__(
        self,
        demand: Callable[[], Mapping[str, RoleDemand]],
        *,
        namespace: str,
        targets: Mapping[str, tuple[str, ScalePolicy]],
        api: ScaleApi,
        busy_by_pod: BusyByPod | None = None,
        costs: PodCostApi | None = None,
        set_replicas: bool = True,
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
        if costs is not None and busy_by_pod is None:
            raise InvalidArgumentError(
                "pod-deletion costs need the busy leases per pod (busy_by_pod)",
                field="autoscale_deletion_cost",
            )
        self._demand = demand
        self._namespace = namespace
        self._targets = dict(targets)
        self._api = api
        self._busy = busy_by_pod
        self._costs = costs
        self._set_replicas = set_replicas
        self._interval = interval_seconds
        self._clock = clock
        self._history: dict[str, History] = dict.fromkeys(self._targets, ())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rounds = 0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        pending_by_role: Counts,
        *,
        leased_by_role: Counts | None = None,
        held_by_role: Counts | None = None,
        busy_by_pod: BusyByPod | None = None,
        api: KubernetesScaleApi | None = None,
    ) -> Autoscaler:
        """Configured from ``DEEP3M_AUTOSCALE_*``; talks to the in-cluster API by default.

        Deletion costs (``autoscale_deletion_cost``) are kept only when the
        scheduler supplies ``busy_by_pod``; otherwise they are skipped with a warning.
        """
        namespace = settings.autoscale_namespace or pod_namespace()
        targets = policies_from_settings(settings)
        kube = api if api is not None else KubernetesScaleApi()
        costs: PodCostApi | None = None
        if settings.autoscale_deletion_cost:
            if busy_by_pod is None:
                log.warning("pod-deletion costs off: the scheduler reports no leases per pod")
            else:
                costs = kube
        return cls(
            demand_from_counts(pending_by_role, leased_by_role, held_by_role),
            namespace=namespace,
            targets=targets,
            api=kube,
            busy_by_pod=busy_by_pod,
            costs=costs,
            set_replicas=settings.autoscale_set_replicas,
            interval_seconds=settings.autoscale_interval_seconds,
        )

    @property
    def rounds(self) -> int:
        """Completed rounds."""
        with self._lock:
            return self._rounds

    def _update_costs(
        self, costs: PodCostApi, busy_by_pod: BusyByPod, role: str, deployment: str
    ) -> int:
        """Write changed deletion costs; returns how many of the pods are busy."""
        busy = busy_by_pod(role)
        pods = costs.pod_costs(self._namespace, deployment)
        for pod, cost in sorted(deletion_costs(pods, busy).items()):
            costs.set_pod_cost(self._namespace, pod, cost)
        return sum(1 for pod in pods if busy.get(pod, 0) > 0)

    def run_once(self) -> dict[str, int]:
        """One round over every role; returns the replicas each Deployment now has."""
        from deep3m.runtime.metrics import AUTOSCALER_ERRORS, AUTOSCALER_REPLICAS

        demands = self._demand()
        now = self._clock()
        result: dict[str, int] = {}
        for role, (deployment, policy) in self._targets.items():
            try:
                demand = demands.get(role, RoleDemand())
                # Costs first: a scale-down in this round (ours or KEDA's) then
                # finds the idle pods marked cheapest.
                if self._costs is not None and self._busy is not None:
                    busy_pods = self._update_costs(self._costs, self._busy, role, deployment)
                    demand = RoleDemand(
                        demand.pending, demand.leased, demand.backoff_held, busy_pods
                    )
                current = self._api.get_replicas(self._namespace, deployment)
                if not self._set_replicas:
                    result[role] = current
                    continue
                step = decide(
                    demand=demand,
                    current=current,
                    policy=policy,
                    history=self._history[role],
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
                self._history[role] = step.history
                result[role] = step.replicas
                AUTOSCALER_REPLICAS.labels(role=role).set(step.replicas)
            except Exception:
                # One role's failure (RBAC, API outage) must not stop the others or the thread.
                AUTOSCALER_ERRORS.labels(role=role).inc()
                log.exception(
                    "cannot scale %s", deployment, extra={"role": role, "deployment": deployment}
                )
        with self._lock:
            self._rounds += 1
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
