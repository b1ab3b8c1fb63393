"""The Kubernetes calls the autoscaler makes, behind two small interfaces.

``ScaleApi`` (a Deployment's ``scale`` subresource) and ``PodCostApi`` (pods'
``pod-deletion-cost`` annotations) are what ``autoscaler.Autoscaler`` needs;
``KubernetesScaleApi`` implements both with the ``kubernetes`` client, in the
pod, with the ServiceAccount token the chart mounts for the scheduler. Tests
drive it against a fake API server (``deep3m.testing.kube_api``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from deep3m.core.errors import FailedPreconditionError

_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# The ReplicaSet controller deletes pods with lower values first (Kubernetes >= 1.22).
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


class ScaleApi(Protocol):
    """The calls the autoscaler makes on the Kubernetes API for replica counts."""

    def get_replicas(self, namespace: str, deployment: str) -> int: ...

    def set_replicas(self, namespace: str, deployment: str, replicas: int) -> None: ...


class PodCostApi(Protocol):
    """The calls that keep pod-deletion costs current."""

    def pod_costs(self, namespace: str, deployment: str) -> dict[str, str | None]:
        """Live pods of ``deployment`` → their ``pod-deletion-cost`` annotation (or None)."""
        ...

    def set_pod_cost(self, namespace: str, pod: str, cost: str) -> None: ...


class KubernetesScaleApi:
    """``apps/v1`` Deployment ``scale`` subresource and pod annotations, via ``kubernetes``."""

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
        self._core = client.CoreV1Api(api_client)

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

    def pod_costs(self, namespace: str, deployment: str) -> dict[str, str | None]:
        # The scale subresource carries the Deployment's label selector as a string,
        # so no read rights on the Deployment itself are needed.
        scale = self._apps.read_namespaced_deployment_scale(deployment, namespace)
        selector = scale.status.selector if scale.status is not None else None
        if not selector:
            return {}
        pods = self._core.list_namespaced_pod(namespace, label_selector=selector).items or []
        return {
            str(pod.metadata.name): (pod.metadata.annotations or {}).get(DELETION_COST)
            for pod in pods
            if pod.metadata is not None and pod.metadata.deletion_timestamp is None
        }

    def set_pod_cost(self, namespace: str, pod: str, cost: str) -> None:
        self._core.patch_namespaced_pod(
            pod,
            namespace,
            {"metadata": {"annotations": {DELETION_COST: cost}}},
            _content_type="application/merge-patch+json",
        )


def pod_namespace() -> str:
    """The namespace of the pod this runs in (its ServiceAccount mount); "" outside one."""
    try:
        return _NAMESPACE_FILE.read_text().strip()
    except OSError:
        return ""
