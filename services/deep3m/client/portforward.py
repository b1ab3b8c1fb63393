"""Reach an in-cluster Service from a laptop through the Kubernetes API.

``port_forward`` does what ``kubectl port-forward svc/NAME PORT`` does, without
kubectl: it resolves the Service to one ready pod behind it and the pod port
its ``targetPort`` names, listens on a free loopback port, and carries every
accepted connection over its own port-forward WebSocket to that pod. Users
need no public endpoint, only a kube context allowed to ``get`` services,
``list`` pods and ``create`` pods/portforward in the namespace.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from deep3m.core.errors import InvalidArgumentError, NotFoundError, UnavailableError

log = logging.getLogger("deep3m.portforward")

_CHUNK = 256 * 1024


@dataclass(frozen=True)
class ForwardTarget:
    """The pod and pod port that a Service port resolves to."""

    pod: str
    port: int


def _api_client(context: str | None, config_file: str | None) -> Any:
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        return config.new_client_from_config(config_file=config_file, context=context)
    except ConfigException as exc:
        raise InvalidArgumentError(
            f"cannot use kube context {context or '(current)'}: {exc}", field="context"
        ) from None
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot read kubeconfig {config_file or '~/.kube/config'}: {exc}", field="context"
        ) from None


def _api_error(exc: Exception, what: str, field: str) -> Exception:
    status = getattr(exc, "status", None)
    if status == 404:
        return NotFoundError(f"{what} not found", field=field)
    if status in (401, 403):
        return InvalidArgumentError(
            f"not allowed to read {what} (HTTP {status}); check the kube context's RBAC",
            field=field,
        )
    return UnavailableError(f"cannot read {what}: {exc}", field=field)


def _is_ready(pod: Any) -> bool:
    if pod.metadata is None or pod.metadata.deletion_timestamp is not None:
        return False
    if pod.status is None or pod.status.phase != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def _name_and_age(pod: Any) -> tuple[str, str]:
    meta = pod.metadata
    return str(meta.creation_timestamp or ""), str(meta.name)


def _container_port(pod: Any, name: str) -> int | None:
    for container in pod.spec.containers if pod.spec is not None else []:
        for port in container.ports or []:
            if port.name == name:
                return int(port.container_port)
    return None


def resolve_target(
    api_client: Any, namespace: str, service: str, remote_port: int | str
) -> ForwardTarget:
    """The ready pod behind ``service`` and its port for the Service port ``remote_port``.

    ``remote_port`` is the Service port's number or its name (``"grpc"``).
    Picks the oldest ready pod (then by name), so repeated calls agree.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client)
    try:
        svc = core.read_namespaced_service(service, namespace)
    except ApiException as exc:
        raise _api_error(exc, f"service {namespace}/{service}", "service") from None
    spec = svc.spec
    if spec is None or not spec.selector:
        raise InvalidArgumentError(
            f"service {namespace}/{service} has no pod selector to forward to", field="service"
        )
    ports = list(spec.ports or [])
    match = next((p for p in ports if remote_port in (p.port, p.name)), None)
    if match is None:
        offered = ", ".join(f"{p.port} ({p.name})" if p.name else str(p.port) for p in ports)
        offered = offered or "none"
        raise InvalidArgumentError(
            f"service {namespace}/{service} has no port {remote_port} (it offers {offered})",
            field="remote_port",
        )
    selector = ",".join(f"{k}={v}" for k, v in sorted(spec.selector.items()))
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items or []
    except ApiException as exc:
        raise _api_error(exc, f"pods of service {namespace}/{service}", "service") from None
    ready: list[Any] = sorted((p for p in pods if _is_ready(p)), key=_name_and_age)
    if not ready:
        raise UnavailableError(
            f"no ready pod behind service {namespace}/{service} ({len(pods)} pods match "
            f"{selector}); is the release installed and are its pods up?",
            field="service",
        )
    pod = ready[0]
    pod_name = _name_and_age(pod)[1]
    target = match.target_port if match.target_port is not None else match.port
    if isinstance(target, str) and not target.isdigit():
        number = _container_port(pod, target)
        if number is None:
            raise InvalidArgumentError(
                f"pod {pod_name} has no container port named {target!r} "
                f"(targetPort of service {namespace}/{service})",
                field="remote_port",
            )
        return ForwardTarget(pod_name, number)
    return ForwardTarget(pod_name, int(target))


# Labels the Helm chart puts on the scheduler's Service whatever the release,
# nameOverride or fullnameOverride (app.kubernetes.io/name follows nameOverride,
# part-of does not).
SCHEDULER_SELECTOR = "app.kubernetes.io/part-of=deep3m,app.kubernetes.io/component=scheduler"
# The name of the scheduler Service's gRPC port in the chart (its number is grpcPort).
SCHEDULER_PORT_NAME = "grpc"


def find_scheduler_service(api_client: Any, namespace: str, release: str | None = None) -> str:
    """The name of the deep3m scheduler Service in ``namespace`` (of ``release`` if given)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    selector = SCHEDULER_SELECTOR + (f",app.kubernetes.io/instance={release}" if release else "")
    try:
        services = client.CoreV1Api(api_client).list_namespaced_service(
            namespace, label_selector=selector
        )
    except ApiException as exc:
        raise _api_error(exc, f"services in namespace {namespace}", "namespace") from None
    names = sorted(str(s.metadata.name) for s in services.items or [] if s.metadata is not None)
    if not names:
        where = f"release {release!r} in namespace {namespace}" if release else namespace
        raise NotFoundError(
            f"no deep3m scheduler Service in {where}; is the chart installed there?",
            field="namespace",
        )
    if len(names) > 1:
        raise InvalidArgumentError(
            f"several deep3m releases in namespace {namespace} ({', '.join(names)}); "
            "name the release",
            field="release",
        )
    return names[0]


def _pump(local: socket.socket, remote: Any, stop: threading.Event) -> None:
    """Copy bytes both ways until either side closes or ``stop`` is set."""
    sockets = [local, remote]
    try:
        while not stop.is_set():
            readable, _, _ = select.select(sockets, [], [], 0.2)
            for sock in readable:
                data = sock.recv(_CHUNK)
                if not data:
                    return
                (remote if sock is local else local).sendall(data)
    except OSError:
        return
    finally:
        linger(remote)
        for sock in (local, remote):
            with contextlib.suppress(OSError):
                sock.close()


def linger(sock: socket.socket, timeout: float = 2.0) -> None:
    """Before closing ``sock``: stop sending, then read until the peer closes too.

    Closing a socket with unread bytes sends a TCP reset, which the peer (the
    Kubernetes client's port-forward thread, on either end) reports as an error
    instead of a closed connection.
    """
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(timeout)
        while sock.recv(65536):
            pass


class _Forwarder:
    def __init__(self, api_client: Any, namespace: str, target: ForwardTarget) -> None:
        self._api_client = api_client
        self._namespace = namespace
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accept = threading.Thread(
            target=self._accept_loop, name="portforward-accept", daemon=True
        )
        self._accept.start()

    def _open_stream(self) -> Any:
        from kubernetes import client
        from kubernetes.stream import portforward

        core = client.CoreV1Api(self._api_client)
        return portforward(
            core.connect_get_namespaced_pod_portforward,
            self._target.pod,
            self._namespace,
            ports=str(self._target.port),
        )

    def _serve(self, conn: socket.socket) -> None:
        try:
            stream = self._open_stream()
        except Exception as exc:
            log.warning("port-forward to %s failed: %s", self._target.pod, exc)
            conn.close()
            return
        _pump(conn, stream.socket(self._target.port), self._stop)
        error = stream.error(self._target.port)
        if error:
            log.warning("port-forward to %s:%d: %s", self._target.pod, self._target.port, error)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            thread = threading.Thread(
                target=self._serve, args=(conn,), name="portforward-conn", daemon=True
            )
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._accept.join(timeout)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)


@contextlib.contextmanager
def port_forward(
    namespace: str,
    service: str,
    remote_port: int | str,
    *,
    context: str | None = None,
    config_file: str | None = None,
) -> Iterator[str]:
    """Forward a loopback port to ``service:remote_port``; yields ``"127.0.0.1:<port>"``.

    ``remote_port``: the Service port's number, or its name.
    ``context`` names a kubeconfig context (default: the current one);
    ``config_file`` a kubeconfig (default: ``$KUBECONFIG`` or ``~/.kube/config``).
    The pod is chosen once, on entry; connections made after it goes away fail
    and a new ``port_forward`` picks another pod.
    """
    if not namespace:
        raise InvalidArgumentError("namespace must not be empty", field="namespace")
    if not service:
        raise InvalidArgumentError("service must not be empty", field="service")
    if isinstance(remote_port, str) and not remote_port:
        raise InvalidArgumentError("remote_port name must not be empty", field="remote_port")
    if isinstance(remote_port, int) and not 0 < remote_port < 65536:
        raise InvalidArgumentError(
            f"remote_port must be in 1..65535, got {remote_port}", field="remote_port"
        )
    api_client = _api_client(context, config_file)
    try:
        target = resolve_target(api_client, namespace, service, remote_port)
        forwarder = _Forwarder(api_client, namespace, target)
        log.info(
            "forwarding 127.0.0.1:%d to %s/%s:%s (pod %s:%d)",
            forwarder.port,
            namespace,
            service,
            remote_port,
            target.pod,
            target.port,
        )
        try:
            yield f"127.0.0.1:{forwarder.port}"
        finally:
            forwarder.close()
    finally:
        api_client.close()


@contextlib.contextmanager
def scheduler_tunnel(
    namespace: str,
    *,
    context: str | None = None,
    release: str | None = None,
    grpc_port: int | str = SCHEDULER_PORT_NAME,
    config_file: str | None = None,
) -> Iterator[str]:
    """Forward to the deep3m scheduler installed by the Helm chart; yields its local address.

    Finds the scheduler Service by the chart's labels and its gRPC port by
    name, so the CLI needs only the kube context and the namespace (and the
    release when one namespace holds several), whatever the chart's name
    overrides and ``grpcPort``.
    """
    if not namespace:
        raise InvalidArgumentError("namespace must not be empty", field="namespace")
    api_client = _api_client(context, config_file)
    try:
        service = find_scheduler_service(api_client, namespace, release)
    finally:
        api_client.close()
    with port_forward(
        namespace, service, grpc_port, context=context, config_file=config_file
    ) as address:
        yield address
