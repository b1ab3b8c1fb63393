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
    KubernetesScaleApi,
    ScalePolicy,
    decide,
    needed_replicas,
    policies_from_settings,
)
from deep3m.testing.kube_api import FakeKubeApi, fake_kube_api
from hypothesis import given
from hypothesis import strategies as st
from kubernetes import client

POLICY = ScalePolicy(max_replicas=4, tasks_per_replica=8, cooldown_seconds=300.0)
NS = "deep3m"


# -- the policy ------------------------------------------------------------------------


def test_scales_up_at_once_to_what_the_queue_needs() -> None:
    step = decide(pending=17, leased=0, current=0, policy=POLICY, needed_at=None, now=10.0)
    assert step.replicas == 3  # ceil(17 / 8)
    assert step.needed_at == 10.0


def test_scale_up_is_capped_at_max_replicas() -> None:
    step = decide(pending=1000, leased=0, current=1, policy=POLICY, needed_at=0.0, now=1.0)
    assert step.replicas == 4


def test_scale_to_zero_waits_for_the_cooldown() -> None:
    busy = decide(pending=5, leased=0, current=0, policy=POLICY, needed_at=None, now=0.0)
    assert busy.replicas == 1
    idle_early = decide(
        pending=0, leased=0, current=1, policy=POLICY, needed_at=busy.needed_at, now=299.0
    )
    assert idle_early.replicas == 1
    assert idle_early.needed_at == 0.0  # the clock keeps running from the last need
    idle_late = decide(
        pending=0, leased=0, current=1, policy=POLICY, needed_at=idle_early.needed_at, now=300.0
    )
    assert idle_late.replicas == 0


def test_unknown_history_starts_the_cooldown_now() -> None:
    # After a scheduler restart nothing is known: keep the replicas, start counting.
    step = decide(pending=0, leased=0, current=2, policy=POLICY, needed_at=None, now=50.0)
    assert (step.replicas, step.needed_at) == (2, 50.0)


def test_demand_in_the_window_restarts_the_cooldown() -> None:
    step = decide(pending=3, leased=0, current=1, policy=POLICY, needed_at=0.0, now=200.0)
    assert (step.replicas, step.needed_at) == (1, 200.0)
    later = decide(pending=0, leased=0, current=1, policy=POLICY, needed_at=200.0, now=400.0)
    assert later.replicas == 1


def test_leased_tasks_keep_their_workers() -> None:
    # Nothing pending but three tasks running on three single-task workers: keep all three.
    step = decide(pending=0, leased=3, current=3, policy=POLICY, needed_at=0.0, now=10_000.0)
    assert step.replicas == 3
    wider = ScalePolicy(max_replicas=4, tasks_per_replica=8, worker_capacity=2)
    assert needed_replicas(0, 3, wider) == 2


def test_lowering_max_replicas_cuts_at_once_but_no_further() -> None:
    small = ScalePolicy(max_replicas=2, tasks_per_replica=8, cooldown_seconds=300.0)
    step = decide(pending=0, leased=0, current=5, policy=small, needed_at=None, now=0.0)
    assert step.replicas == 2


def test_min_replicas_is_kept() -> None:
    warm = ScalePolicy(max_replicas=4, min_replicas=1, cooldown_seconds=0.0)
    assert decide(pending=0, leased=0, current=3, policy=warm, needed_at=0.0, now=1.0).replicas == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_replicas": -1}, "max_replicas"),
        ({"max_replicas": 2, "min_replicas": 3}, "max_replicas"),
        ({"max_replicas": 2, "tasks_per_replica": 0}, "tasks_per_replica"),
        ({"max_replicas": 2, "worker_capacity": 0}, "worker_capacity"),
        ({"max_replicas": 2, "cooldown_seconds": -1.0}, "cooldown_seconds"),
    ],
)
def test_bad_policy_is_refused(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        ScalePolicy(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


def test_negative_counts_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="pending=-1"):
        needed_replicas(-1, 0, POLICY)


@given(
    pending=st.integers(0, 500),
    leased=st.integers(0, 50),
    current=st.integers(0, 10),
    since=st.floats(0, 1000),
    now=st.floats(0, 2000),
)
def test_decisions_stay_in_bounds_and_never_drop_busy_workers(
    pending: int, leased: int, current: int, since: float, now: float
) -> None:
    step = decide(
        pending=pending,
        leased=leased,
        current=current,
        policy=POLICY,
        needed_at=since,
        now=max(now, since),
    )
    assert 0 <= step.replicas <= POLICY.max_replicas
    assert step.replicas >= min(needed_replicas(pending, leased, POLICY), POLICY.max_replicas)
    if pending or leased:
        assert step.replicas >= 1


# -- settings --------------------------------------------------------------------------


def test_policies_from_settings_with_per_role_overrides() -> None:
    settings = Settings(
        autoscale_deployments="inference=rel-deep3m-inference, training=rel-deep3m-training",
        autoscale_max_replicas=4,
        autoscale_max_replicas_by_role="training=3",
        autoscale_tasks_per_replica=8,
        autoscale_tasks_per_replica_by_role="training=1",
        autoscale_cooldown_seconds=120,
        worker_capacity=2,
    )
    targets = policies_from_settings(settings)
    assert targets["inference"] == (
        "rel-deep3m-inference",
        ScalePolicy(max_replicas=4, tasks_per_replica=8, cooldown_seconds=120, worker_capacity=2),
    )
    assert targets["training"][1].max_replicas == 3
    assert targets["training"][1].tasks_per_replica == 1


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
        Autoscaler(lambda: {}, namespace="", targets={}, api=_NullApi())
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


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rounds_patch_the_scale_subresource(kube: FakeKubeApi) -> None:
    kube.add_deployment(NS, "rel-deep3m-inference", 0)
    kube.add_deployment(NS, "rel-deep3m-training", 0)
    queue = {"inference": 20, "training": 0}
    clock = _Clock()
    targets = {
        "inference": ("rel-deep3m-inference", POLICY),
        "training": ("rel-deep3m-training", ScalePolicy(max_replicas=3, tasks_per_replica=1)),
    }
    scaler = Autoscaler(
        lambda: queue, namespace=NS, targets=targets, api=_scale_api(kube), clock=clock
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

    # Queue drained: nothing changes inside the cool-down, then straight to zero.
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
        lambda: {"inference": 3},
        namespace=NS,
        targets={"inference": ("inf", POLICY)},
        api=_scale_api(kube),
        clock=_Clock(),
    )
    # Two replicas already run and one is needed: keep both during the cool-down.
    assert scaler.run_once() == {"inference": 2}
    assert kube.patches() == []


def test_api_errors_are_counted_and_other_roles_still_scale(kube: FakeKubeApi) -> None:
    kube.add_deployment(NS, "train", 0)
    # "inf" does not exist: 404 from the API for that role only.
    scaler = Autoscaler(
        lambda: {"inference": 5, "training": 2},
        namespace=NS,
        targets={
            "inference": ("inf", POLICY),
            "training": ("train", ScalePolicy(max_replicas=3, tasks_per_replica=1)),
        },
        api=_scale_api(kube),
        clock=_Clock(),
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
