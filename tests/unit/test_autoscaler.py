"""The autoscaler: the pure policy, and the real ``kubernetes`` client against a loopback API.

No Kubernetes API server runs here: the API side is ``deep3m.testing.kube_api``,
a small HTTP server that speaks the apps/v1 ``deployments/{name}/scale``
endpoints, so the real client library's requests (paths, content type, bodies)
are checked. Behaviour against a real API server (RBAC, admission) is not.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from deep3m.core.errors import FailedPreconditionError, InvalidArgumentError
from deep3m.runtime.metrics import AUTOSCALER_ERRORS
from deep3m.runtime.settings import Settings
from deep3m.scheduler.autoscaler import (
    Autoscaler,
    RoleDemand,
    ScalePolicy,
    busy_leases,
    decide,
    deletion_costs,
    demand_from_counts,
    needed_replicas,
    policies_from_settings,
)
from deep3m.scheduler.kube import DELETION_COST, KubernetesScaleApi
from deep3m.testing.clock import ManualClock
from deep3m.testing.kube_api import FakeKubeApi, FakePod, fake_kube_api
from hypothesis import given
from hypothesis import strategies as st
from kubernetes import client

POLICY = ScalePolicy(max_replicas=4, tasks_per_replica=8, cooldown_seconds=300.0)
NS = "deep3m"


# -- the policy ------------------------------------------------------------------------


def demand(pending: int = 0, leased: int = 0, held: int = 0, busy: int | None = None) -> RoleDemand:
    return RoleDemand(pending=pending, leased=leased, backoff_held=held, busy_pods=busy)


def test_scales_up_at_once_to_what_the_queue_needs() -> None:
    step = decide(demand=demand(17), current=0, policy=POLICY, history=(), now=10.0)
    assert step.replicas == 3  # ceil(17 / 8)
    assert step.history[-1] == (10.0, 3)


def test_scale_up_is_capped_at_max_replicas() -> None:
    step = decide(demand=demand(1000), current=1, policy=POLICY, history=(), now=1.0)
    assert step.replicas == 4


def test_scale_to_zero_waits_for_the_window() -> None:
    busy = decide(demand=demand(5), current=0, policy=POLICY, history=(), now=0.0)
    assert busy.replicas == 1
    early = decide(demand=demand(), current=1, policy=POLICY, history=busy.history, now=299.0)
    assert early.replicas == 1
    late = decide(demand=demand(), current=1, policy=POLICY, history=early.history, now=300.0)
    assert late.replicas == 0


def test_scale_down_goes_to_the_highest_need_in_the_window_not_the_need_now() -> None:
    # 4 replicas needed at t=0, 2 at t=100, nothing from t=200 on.
    history: tuple[tuple[float, int], ...] = ()
    replicas = 0
    for now, pending in [(0.0, 32), (100.0, 16), (200.0, 0)]:
        step = decide(
            demand=demand(pending), current=replicas, policy=POLICY, history=history, now=now
        )
        history, replicas = step.history, step.replicas
    assert replicas == 4  # within the window of the 4
    step = decide(demand=demand(), current=4, policy=POLICY, history=history, now=310.0)
    # The need of 4 (t=0) has left the window; the 2 of t=100 has not: 2, not 0.
    assert step.replicas == 2
    step = decide(demand=demand(), current=2, policy=POLICY, history=step.history, now=410.0)
    assert step.replicas == 0  # nothing but zeros left in the window


def test_unknown_history_keeps_the_replicas_for_a_window() -> None:
    # After a scheduler restart nothing is known: keep the replicas, start counting.
    step = decide(demand=demand(), current=2, policy=POLICY, history=(), now=50.0)
    assert step.replicas == 2
    later = decide(demand=demand(), current=2, policy=POLICY, history=step.history, now=349.0)
    assert later.replicas == 2
    gone = decide(demand=demand(), current=2, policy=POLICY, history=later.history, now=350.0)
    assert gone.replicas == 0


def test_demand_in_the_window_keeps_the_replicas() -> None:
    first = decide(demand=demand(3), current=1, policy=POLICY, history=(), now=200.0)
    later = decide(demand=demand(), current=1, policy=POLICY, history=first.history, now=400.0)
    assert later.replicas == 1


def test_leased_tasks_keep_their_workers_with_per_role_pod_capacity() -> None:
    # Nothing pending but three tasks running on three single-task workers: keep all three.
    step = decide(demand=demand(0, 3), current=3, policy=POLICY, history=(), now=10_000.0)
    assert step.replicas == 3
    wider = ScalePolicy(max_replicas=4, tasks_per_replica=8, worker_capacity=2)
    assert needed_replicas(demand(0, 3), wider) == 2
    # Two GPUs per pod, one task per GPU: a pod holds two leases.
    two_gpus = ScalePolicy(max_replicas=4, worker_capacity=1, gpus_per_pod=2)
    assert two_gpus.pod_capacity == 2
    assert needed_replicas(demand(0, 4), two_gpus) == 2
    cpu_only = ScalePolicy(max_replicas=4, worker_capacity=3, gpus_per_pod=0)
    assert cpu_only.pod_capacity == 3


def test_backoff_held_tasks_are_not_counted() -> None:
    # 16 pending, of which 15 wait out a retry backoff: one leasable task, one pod.
    assert needed_replicas(demand(16, held=15), POLICY) == 1
    assert needed_replicas(demand(16, held=16), POLICY) == 0
    assert needed_replicas(demand(16), POLICY) == 2


def test_busy_pods_are_a_floor() -> None:
    # Three leases spread over three 2-task pods: capacity says 2, but all three are busy.
    wider = ScalePolicy(max_replicas=4, worker_capacity=2, cooldown_seconds=0.0)
    assert needed_replicas(demand(0, 3), wider) == 2
    assert needed_replicas(demand(0, 3, busy=3), wider) == 3


def test_lowering_max_replicas_cuts_at_once_but_no_further() -> None:
    small = ScalePolicy(max_replicas=2, tasks_per_replica=8, cooldown_seconds=300.0)
    step = decide(demand=demand(), current=5, policy=small, history=(), now=0.0)
    assert step.replicas == 2


def test_min_replicas_is_kept() -> None:
    warm = ScalePolicy(max_replicas=4, min_replicas=1, cooldown_seconds=0.0)
    step = decide(demand=demand(), current=3, policy=warm, history=((0.0, 3),), now=1.0)
    assert step.replicas == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_replicas": -1}, "max_replicas"),
        ({"max_replicas": 2, "min_replicas": 3}, "max_replicas"),
        ({"max_replicas": 2, "tasks_per_replica": 0}, "tasks_per_replica"),
        ({"max_replicas": 2, "worker_capacity": 0}, "worker_capacity"),
        ({"max_replicas": 2, "gpus_per_pod": -1}, "gpus_per_pod"),
        ({"max_replicas": 2, "cooldown_seconds": -1.0}, "cooldown_seconds"),
    ],
)
def test_bad_policy_is_refused(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        ScalePolicy(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pending": -1}, "pending"),
        ({"leased": -2}, "leased"),
        ({"pending": 1, "backoff_held": 2}, "backoff_held"),
        ({"busy_pods": -1}, "busy_pods"),
    ],
)
def test_bad_demand_is_refused(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        RoleDemand(**kwargs)
    assert err.value.field == field


@given(
    pending=st.integers(0, 500),
    held=st.integers(0, 500),
    leased=st.integers(0, 50),
    current=st.integers(0, 10),
    needs=st.lists(st.tuples(st.floats(0, 1000), st.integers(0, 4)), max_size=5),
    now=st.floats(0, 2000),
)
def test_decisions_stay_in_bounds_and_never_drop_busy_workers(
    pending: int,
    held: int,
    leased: int,
    current: int,
    needs: list[tuple[float, int]],
    now: float,
) -> None:
    history = tuple(sorted((min(t, now), n) for t, n in needs))
    asked = demand(pending, leased, min(held, pending))
    step = decide(demand=asked, current=current, policy=POLICY, history=history, now=now)
    assert 0 <= step.replicas <= POLICY.max_replicas
    assert step.replicas >= needed_replicas(asked, POLICY)
    if asked.leasable or leased:
        assert step.replicas >= 1
    # Never a scale-down below the highest need of the window.
    in_window = [n for t, n in history if now - t < POLICY.cooldown_seconds]
    if step.replicas < min(current, POLICY.max_replicas):
        assert step.replicas >= max(in_window, default=0)


def test_busy_leases_group_holders_by_role_and_pod() -> None:
    holders = [("inference", "inf-a"), ("inference", "inf-a"), ("training", "tr-0")]
    assert busy_leases(holders) == {"inference": {"inf-a": 2}, "training": {"tr-0": 1}}
    assert busy_leases([]) == {}


def test_deletion_costs_mark_idle_pods_cheapest_and_only_changes() -> None:
    pods = {"a": None, "b": "0", "c": "1", "d": "5"}
    busy = {"c": 1, "d": 2, "gone": 3}
    # a: idle, unannotated → 0; b: idle, already 0 → unchanged; c: unchanged; d: 5 → 2.
    assert deletion_costs(pods, busy) == {"a": "0", "d": "2"}


# -- settings --------------------------------------------------------------------------


def test_policies_from_settings_with_per_role_overrides() -> None:
    settings = Settings(
        autoscale_deployments="inference=rel-deep3m-inference, training=rel-deep3m-training",
        autoscale_max_replicas=4,
        autoscale_max_replicas_by_role="training=3",
        autoscale_tasks_per_replica=8,
        autoscale_tasks_per_replica_by_role="training=1",
        autoscale_cooldown_seconds=120,
        autoscale_worker_capacity_by_role="training=1",
        autoscale_gpus_per_pod_by_role="training=4,inference=1",
        worker_capacity=2,
    )
    targets = policies_from_settings(settings)
    assert targets["inference"] == (
        "rel-deep3m-inference",
        ScalePolicy(max_replicas=4, tasks_per_replica=8, cooldown_seconds=120, worker_capacity=2),
    )
    training = targets["training"][1]
    assert training.max_replicas == 3
    assert training.tasks_per_replica == 1
    # Per-role capacity, not the scheduler's own worker_capacity: 1 task per GPU x 4 GPUs.
    assert (training.worker_capacity, training.gpus_per_pod, training.pod_capacity) == (1, 4, 4)


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"autoscale_deployments": ""}, "autoscale_deployments", "DEEP3M_AUTOSCALE_DEPLOYMENTS"),
        ({"autoscale_deployments": "inference"}, "autoscale_deployments", "'inference'"),
        ({"autoscale_deployments": "gpu=x"}, "autoscale_deployments", "'gpu'"),
        ({"autoscale_deployments": "scheduler=x"}, "autoscale_deployments", "'scheduler'"),
        ({"autoscale_deployments": "inference=a,inference=b"}, "autoscale_deployments", "twice"),
        (
            {"autoscale_max_replicas_by_role": "inference=many"},
            "autoscale_max_replicas_by_role",
            "'many'",
        ),
        (
            {"autoscale_max_replicas_by_role": "training=2"},
            "autoscale_max_replicas_by_role",
            "training",
        ),
        (
            {"autoscale_tasks_per_replica_by_role": "inference=0"},
            "autoscale_tasks_per_replica_by_role",
            "inference=0",
        ),
        (
            {"autoscale_worker_capacity_by_role": "inference=0"},
            "autoscale_worker_capacity_by_role",
            "inference=0",
        ),
        (
            {"autoscale_gpus_per_pod_by_role": "training=1"},
            "autoscale_gpus_per_pod_by_role",
            "training",
        ),
    ],
)
def test_bad_autoscale_settings_name_the_field(
    overrides: dict[str, str], field: str, words: str
) -> None:
    values = {"autoscale_deployments": "inference=rel-deep3m-inference", **overrides}
    with pytest.raises(InvalidArgumentError) as err:
        policies_from_settings(Settings(**values))  # type: ignore[arg-type]
    assert err.value.field == field
    assert words in err.value.message


def test_autoscaler_needs_a_namespace() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        Autoscaler(demand_from_counts(dict), namespace="", targets={}, api=_NullApi())
    assert err.value.field == "autoscale_namespace"


def test_outside_a_cluster_the_api_is_a_failed_precondition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(FailedPreconditionError) as err:
        KubernetesScaleApi()
    assert err.value.field == "autoscale_enabled"


class _NullApi:
    def get_replicas(self, namespace: str, deployment: str) -> int:
        return 0

    def set_replicas(self, namespace: str, deployment: str, replicas: int) -> None:
        raise AssertionError("not expected")


# -- against the loopback API ----------------------------------------------------------


@pytest.fixture
def kube() -> Iterator[FakeKubeApi]:
    with fake_kube_api() as api:
        yield api


def _scale_api(kube: FakeKubeApi) -> KubernetesScaleApi:
    configuration = client.Configuration()
    configuration.host = kube.url
    return KubernetesScaleApi(client.ApiClient(configuration))


def test_rounds_patch_the_scale_subresource(kube: FakeKubeApi) -> None:
    kube.add_deployment(NS, "rel-deep3m-inference", 0)
    kube.add_deployment(NS, "rel-deep3m-training", 0)
    queue = {"inference": 20, "training": 0}
    clock = ManualClock()
    targets = {
        "inference": ("rel-deep3m-inference", POLICY),
        "training": ("rel-deep3m-training", ScalePolicy(max_replicas=3, tasks_per_replica=1)),
    }
    scaler = Autoscaler(
        demand_from_counts(lambda: queue),
        namespace=NS,
        targets=targets,
        api=_scale_api(kube),
        clock=clock,
    )

    assert scaler.run_once() == {"inference": 3, "training": 0}
    patches = kube.patches()
    assert len(patches) == 1  # training already matches: nothing sent
    assert (
        patches[0].path == f"/apis/apps/v1/namespaces/{NS}/deployments/rel-deep3m-inference/scale"
    )
    assert patches[0].content_type == "application/merge-patch+json"
    assert patches[0].body == {"spec": {"replicas": 3}}
    assert kube.replicas(NS, "rel-deep3m-inference") == 3

    # Queue drained: nothing changes inside the window, then down to zero.
    queue["inference"] = 0
    clock.now += 299
    scaler.run_once()
    assert kube.replicas(NS, "rel-deep3m-inference") == 3
    clock.now += 1
    scaler.run_once()
    assert kube.replicas(NS, "rel-deep3m-inference") == 0
    assert [p.body for p in kube.patches()] == [
        {"spec": {"replicas": 3}},
        {"spec": {"replicas": 0}},
    ]


def test_replicas_changed_by_someone_else_are_read_back(kube: FakeKubeApi) -> None:
    kube.add_deployment(NS, "inf", 2)
    scaler = Autoscaler(
        demand_from_counts(lambda: {"inference": 3}),
        namespace=NS,
        targets={"inference": ("inf", POLICY)},
        api=_scale_api(kube),
        clock=ManualClock(),
    )
    # Two replicas already run and one is needed: keep both during the cool-down.
    assert scaler.run_once() == {"inference": 2}
    assert kube.patches() == []


def test_api_errors_are_counted_and_other_roles_still_scale(kube: FakeKubeApi) -> None:
    kube.add_deployment(NS, "train", 0)
    # "inf" does not exist: 404 from the API for that role only.
    scaler = Autoscaler(
        demand_from_counts(lambda: {"inference": 5, "training": 2}),
        namespace=NS,
        targets={
            "inference": ("inf", POLICY),
            "training": ("train", ScalePolicy(max_replicas=3, tasks_per_replica=1)),
        },
        api=_scale_api(kube),
        clock=ManualClock(),
    )
    before = AUTOSCALER_ERRORS.labels(role="inference")._value.get()
    assert scaler.run_once() == {"training": 2}
    assert AUTOSCALER_ERRORS.labels(role="inference")._value.get() == before + 1
    assert kube.replicas(NS, "train") == 2


def test_thread_scales_until_stopped(kube: FakeKubeApi) -> None:
    kube.add_deployment(NS, "inf", 0)
    queue = {"inference": 9}
    lock = threading.Lock()

    def pending() -> dict[str, int]:
        with lock:
            return dict(queue)

    scaler = Autoscaler.from_settings(
        Settings(
            autoscale_enabled=True,
            autoscale_namespace=NS,
            autoscale_deployments="inference=inf",
            autoscale_cooldown_seconds=0,
            autoscale_interval_seconds=0.01,
        ),
        pending,
        api=_scale_api(kube),
    )
    scaler.start()
    try:
        patches = kube.wait_for_patches(1, timeout=10)
        assert patches[0].body == {"spec": {"replicas": 2}}  # ceil(9 / 8)
        with lock:
            queue["inference"] = 0
        patches = kube.wait_for_patches(2, timeout=10)
        assert patches[1].body == {"spec": {"replicas": 0}}
    finally:
        scaler.stop()
    assert scaler.rounds >= 2


# -- pod-deletion cost: scale-downs remove idle pods ------------------------------------


WORKER_LABELS = {"app.kubernetes.io/instance": "rel", "app.kubernetes.io/component": "inference"}


def _inference_pods(kube: FakeKubeApi, names: list[str]) -> None:
    kube.add_deployment(NS, "inf", len(names), selector=WORKER_LABELS)
    for i, name in enumerate(names):
        # Later names are newer: without costs the ReplicaSet removes them first.
        kube.add_pod(NS, FakePod(name, dict(WORKER_LABELS), created=f"2026-11-01T00:0{i}:00Z"))


def test_scale_down_removes_idle_pods_not_the_busy_ones(kube: FakeKubeApi) -> None:
    _inference_pods(kube, ["inf-old-idle", "inf-busy-1", "inf-busy-2"])
    leases = {"inf-busy-1": 1, "inf-busy-2": 1}
    queue = {"inference": 0}
    policy = ScalePolicy(max_replicas=4, tasks_per_replica=8, cooldown_seconds=0.0)
    api = _scale_api(kube)
    scaler = Autoscaler(
        demand_from_counts(lambda: queue, lambda: {"inference": sum(leases.values())}),
        namespace=NS,
        targets={"inference": ("inf", policy)},
        api=api,
        busy_by_pod=lambda role: dict(leases) if role == "inference" else {},
        costs=api,
        clock=ManualClock(),
    )
    assert scaler.run_once() == {"inference": 2}
    # Both busy pods survive; the idle one, though the oldest, went.
    assert kube.pod_names(NS) == ["inf-busy-1", "inf-busy-2"]
    assert kube.annotations(NS, "inf-busy-1") == {DELETION_COST: "1"}
    # Costs were written before the replica count dropped.
    methods = [(r.method, r.path.rsplit("/", 1)[-1]) for r in kube.requests]
    assert methods.index(("PATCH", "inf-old-idle")) < methods.index(("PATCH", "scale"))

    # One busy pod finishes: it becomes the cheapest and is the one removed.
    leases["inf-busy-1"] = 0
    assert scaler.run_once() == {"inference": 1}
    assert kube.pod_names(NS) == ["inf-busy-2"]


def test_without_costs_the_replica_set_would_kill_a_busy_pod(kube: FakeKubeApi) -> None:
    # The same cluster, costs off: the newest pod goes, busy or not (what the fix prevents).
    _inference_pods(kube, ["inf-old-idle", "inf-busy-1", "inf-busy-2"])
    scaler = Autoscaler(
        demand_from_counts(lambda: {"inference": 0}, lambda: {"inference": 2}),
        namespace=NS,
        targets={"inference": ("inf", ScalePolicy(max_replicas=4, cooldown_seconds=0.0))},
        api=_scale_api(kube),
        clock=ManualClock(),
    )
    scaler.run_once()
    assert kube.pod_names(NS) == ["inf-busy-1", "inf-old-idle"]


def test_keda_mode_keeps_costs_and_leaves_the_count_alone(kube: FakeKubeApi) -> None:
    _inference_pods(kube, ["inf-a", "inf-b"])
    api = _scale_api(kube)
    scaler = Autoscaler(
        demand_from_counts(lambda: {"inference": 0}),
        namespace=NS,
        targets={"inference": ("inf", ScalePolicy(max_replicas=4, cooldown_seconds=0.0))},
        api=api,
        busy_by_pod=lambda role: {"inf-b": 3},
        costs=api,
        set_replicas=False,
        clock=ManualClock(),
    )
    assert scaler.run_once() == {"inference": 2}
    assert [p.path.rsplit("/", 1)[-1] for p in kube.patches()] == ["inf-a", "inf-b"]
    assert kube.annotations(NS, "inf-b") == {DELETION_COST: "3"}
    # A second round finds nothing to change and sends nothing.
    scaler.run_once()
    assert len(kube.patches()) == 2


def test_costs_need_a_busy_source() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        Autoscaler(
            demand_from_counts(dict),
            namespace=NS,
            targets={},
            api=_NullApi(),
            costs=_NullCosts(),
        )
    assert err.value.field == "autoscale_deletion_cost"


class _NullCosts:
    def pod_costs(self, namespace: str, deployment: str) -> dict[str, str | None]:
        return {}

    def set_pod_cost(self, namespace: str, pod: str, cost: str) -> None:
        raise AssertionError("not expected")
