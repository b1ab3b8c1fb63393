"""A tiny Kubernetes API server on loopback, for tests of the Kubernetes clients.

It speaks just the endpoints deep3m uses, in the wire format of the real API
server, so the real ``kubernetes`` client library can be pointed at it:

- ``GET/PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`` (the
  autoscaler; PATCH accepts ``application/merge-patch+json`` only and records
  every request; ``status.selector`` carries the Deployment's pod selector).
  A scale-down removes pods the way the ReplicaSet controller ranks them, in
  a simplified form: lowest ``controller.kubernetes.io/pod-deletion-cost``
  first, then the newest,
- ``PATCH /api/v1/namespaces/{ns}/pods/{name}`` (merge patch of
  ``metadata.annotations``: pod-deletion costs),
- ``GET /api/v1/namespaces/{ns}/services/{name}``,
  ``GET /api/v1/namespaces/{ns}/services?labelSelector=...`` and
  ``GET /api/v1/namespaces/{ns}/pods?labelSelector=...`` (port-forward target
  resolution; equality selectors only),
- ``GET /api/v1/namespaces/{ns}/pods/{name}/portforward?ports=N`` upgraded to a
  WebSocket that speaks the ``v4.channel.k8s.io`` port-forward protocol and
  relays the bytes to a real TCP address on loopback (standing in for the pod).

It is no substitute for a real API server (no authentication, RBAC, watches,
SPDY or kubelet); it exists so the client side can be exercised end to end.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from deep3m.client.portforward import linger

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_BINARY = 0x2
_OP_CLOSE = 0x8
_OP_PING = 0x9
_OP_PONG = 0xA


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    content_type: str
    body: Any


@dataclass
class FakePod:
    name: str
    labels: dict[str, str]
    ready: bool = True
    phase: str = "Running"
    terminating: bool = False
    # Named container ports, {"grpc": 50051}; used to resolve a Service's targetPort.
    container_ports: dict[str, int] = field(default_factory=dict)
    created: str = "2026-11-01T00:00:00Z"
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self, namespace: str) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": self.name,
            "namespace": namespace,
            "labels": dict(self.labels),
            "creationTimestamp": self.created,
        }
        if self.annotations:
            meta["annotations"] = dict(self.annotations)
        if self.terminating:
            meta["deletionTimestamp"] = "2026-11-01T00:05:00Z"
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": "deep3m:test",
                        "ports": [
                            {"name": n, "containerPort": p, "protocol": "TCP"}
                            for n, p in self.container_ports.items()
                        ],
                    }
                ]
            },
            "status": {
                "phase": self.phase,
                "conditions": [{"type": "Ready", "status": "True" if self.ready else "False"}],
            },
        }


class FakeKubeApi:
    """State and request log of the fake API server; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.scales: dict[tuple[str, str], int] = {}
        self.selectors: dict[tuple[str, str], dict[str, str]] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[str, list[FakePod]] = {}
        # Where the bytes of a port-forward to (namespace, pod, port) go.
        self.forward_targets: dict[tuple[str, str, int], tuple[str, int]] = {}
        self.requests: list[RecordedRequest] = []
        self._failures: list[int] = []
        self.patched = threading.Condition(self._lock)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- state -------------------------------------------------------------------------

    def add_deployment(
        self,
        namespace: str,
        name: str,
        replicas: int,
        selector: Mapping[str, str] | None = None,
    ) -> None:
        """A Deployment's scale; with ``selector``, scale-downs remove its matching pods."""
        with self._lock:
            self.scales[(namespace, name)] = replicas
            if selector is not None:
                self.selectors[(namespace, name)] = dict(selector)

    def pod_names(self, namespace: str) -> list[str]:
        with self._lock:
            return sorted(p.name for p in self.pods.get(namespace, []))

    def annotations(self, namespace: str, pod: str) -> dict[str, str]:
        with self._lock:
            return next(dict(p.annotations) for p in self.pods[namespace] if p.name == pod)

    def replicas(self, namespace: str, name: str) -> int:
        with self._lock:
            return self.scales[(namespace, name)]

    def add_service(
        self,
        namespace: str,
        name: str,
        selector: Mapping[str, str],
        ports: list[dict[str, Any]],
        labels: Mapping[str, str] | None = None,
    ) -> None:
        with self._lock:
            self.services[(namespace, name)] = {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
                "spec": {"selector": dict(selector), "ports": ports, "type": "ClusterIP"},
            }

    def add_pod(self, namespace: str, pod: FakePod) -> None:
        with self._lock:
            self.pods.setdefault(namespace, []).append(pod)

    def fail_next(self, status: int) -> None:
        """Answer the next request with ``status`` (a Status object), once."""
        with self._lock:
            self._failures.append(status)

    def patches(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == "PATCH"]

    def wait_for_patches(self, count: int, timeout: float) -> list[RecordedRequest]:
        """Block until at least ``count`` PATCH requests arrived (or the timeout)."""
        with self.patched:
            self.patched.wait_for(
                lambda: sum(r.method == "PATCH" for r in self.requests) >= count, timeout
            )
            return [r for r in self.requests if r.method == "PATCH"]

    # -- server ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("server not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeKubeApi:
        api = self

        class Handler(_Handler):
            state = api

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-kube-api",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def write_kubeconfig(self, path: Path, context: str, namespace: str = "default") -> Path:
        """A kubeconfig with one context, ``context``, pointing at this server."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [
                {
                    "name": context,
                    "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                }
            ],
            "current-context": context,
        }
        path.write_text(json.dumps(config))
        return path

    # -- request handling (called from handler threads) --------------------------------

    def _scale_pods(self, namespace: str, name: str, replicas: int) -> None:
        """Remove pods beyond ``replicas`` as the ReplicaSet would (lock held)."""
        selector = self.selectors.get((namespace, name))
        if selector is None:
            return
        pods = self.pods.get(namespace, [])
        owned = [p for p in pods if selector.items() <= p.labels.items()]
        excess = len(owned) - replicas
        if excess <= 0:
            return

        def cost(pod: FakePod) -> int:
            return int(pod.annotations.get("controller.kubernetes.io/pod-deletion-cost", "0"))

        # Lower cost first; among equal costs the newer pod (a stable sort of newest-first).
        newest_first = sorted(owned, key=lambda p: p.created, reverse=True)
        doomed = {id(p) for p in sorted(newest_first, key=cost)[:excess]}
        self.pods[namespace] = [p for p in pods if id(p) not in doomed]

    def _patch_pod(self, namespace: str, name: str, body: Any) -> FakePod | None:
        annotations = ((body or {}).get("metadata") or {}).get("annotations") or {}
        with self._lock:
            for pod in self.pods.get(namespace, []):
                if pod.name == name:
                    for key, value in annotations.items():
                        if value is None:
                            pod.annotations.pop(key, None)
                        else:
                            pod.annotations[key] = str(value)
                    return pod
        return None

    def _record(self, request: RecordedRequest) -> int | None:
        with self._lock:
            self.requests.append(request)
            self.patched.notify_all()
            return self._failures.pop(0) if self._failures else None


@contextlib.contextmanager
def fake_kube_api() -> Iterator[FakeKubeApi]:
    api = FakeKubeApi().start()
    try:
        yield api
    finally:
        api.stop()


def _status(code: int, message: str) -> dict[str, Any]:
    reason = {404: "NotFound", 415: "UnsupportedMediaType", 422: "Invalid"}.get(code, "Error")
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class _Handler(BaseHTTPRequestHandler):
    state: FakeKubeApi
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output quiet

    def _send_json(self, code: int, payload: Mapping[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else None

    def _handle(self, method: str) -> None:
        split = urlsplit(self.path)
        parts = split.path.strip("/").split("/")
        query = {k: v[0] for k, v in parse_qs(split.query).items()}
        body = self._read_body() if method == "PATCH" else None
        forced = self.state._record(
            RecordedRequest(method, split.path, self.headers.get("Content-Type", ""), body)
        )
        if forced is not None:
            self._send_json(forced, _status(forced, f"injected failure {forced}"))
            return
        # /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale
        if parts[:3] == ["apis", "apps", "v1"] and len(parts) == 8 and parts[7] == "scale":
            self._scale(method, parts[4], parts[6], body)
        elif parts[:2] == ["api", "v1"] and len(parts) == 6 and parts[4] == "services":
            self._service(parts[3], parts[5])
        elif parts[:2] == ["api", "v1"] and len(parts) == 5 and parts[4] == "services":
            self._services(parts[3], query.get("labelSelector", ""))
        elif parts[:2] == ["api", "v1"] and len(parts) == 5 and parts[4] == "pods":
            self._pods(parts[3], query.get("labelSelector", ""))
        elif parts[:2] == ["api", "v1"] and len(parts) == 6 and parts[4] == "pods":
            self._pod_patch(method, parts[3], parts[5], body)
        elif parts[:2] == ["api", "v1"] and len(parts) == 7 and parts[6] == "portforward":
            self._portforward(parts[3], parts[5], query)
        else:
            self._send_json(404, _status(404, f"no route for {method} {split.path}"))

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    # -- endpoints ---------------------------------------------------------------------

    def _scale(self, method: str, namespace: str, name: str, body: Any) -> None:
        key = (namespace, name)
        with self.state._lock:
            exists = key in self.state.scales
        if not exists:
            self._send_json(
                404, _status(404, f'deployments.apps "{name}" not found in {namespace}')
            )
            return
        if method == "PATCH":
            if self.headers.get("Content-Type") != "application/merge-patch+json":
                self._send_json(415, _status(415, "expected application/merge-patch+json"))
                return
            replicas = (body or {}).get("spec", {}).get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                self._send_json(422, _status(422, f"invalid spec.replicas {replicas!r}"))
                return
            with self.state._lock:
                self.state._scale_pods(namespace, name, replicas)
                self.state.scales[key] = replicas
        with self.state._lock:
            replicas = self.state.scales[key]
            selector = ",".join(f"{k}={v}" for k, v in self.state.selectors.get(key, {}).items())
        self._send_json(
            200,
            {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"replicas": replicas},
                "status": {"replicas": replicas, "selector": selector},
            },
        )

    def _pod_patch(self, method: str, namespace: str, name: str, body: Any) -> None:
        if method != "PATCH":
            self._send_json(405, _status(405, "only PATCH of pods is served"))
            return
        if self.headers.get("Content-Type") != "application/merge-patch+json":
            self._send_json(415, _status(415, "expected application/merge-patch+json"))
            return
        pod = self.state._patch_pod(namespace, name, body)
        if pod is None:
            self._send_json(404, _status(404, f'pods "{name}" not found'))
        else:
            self._send_json(200, pod.to_json(namespace))

    def _service(self, namespace: str, name: str) -> None:
        with self.state._lock:
            service = self.state.services.get((namespace, name))
        if service is None:
            self._send_json(404, _status(404, f'services "{name}" not found'))
        else:
            self._send_json(200, service)

    def _services(self, namespace: str, selector: str) -> None:
        with self.state._lock:
            items = [
                svc
                for (ns, _), svc in sorted(self.state.services.items())
                if ns == namespace and _selector_matches(selector, svc["metadata"]["labels"])
            ]
        self._send_json(
            200, {"apiVersion": "v1", "kind": "ServiceList", "metadata": {}, "items": items}
        )

    def _pods(self, namespace: str, selector: str) -> None:
        with self.state._lock:
            pods = [
                p.to_json(namespace)
                for p in self.state.pods.get(namespace, [])
                if _selector_matches(selector, p.labels)
            ]
        self._send_json(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods})

    def _portforward(self, namespace: str, pod: str, query: Mapping[str, str]) -> None:
        port = int(query.get("ports", "0"))
        with self.state._lock:
            target = self.state.forward_targets.get((namespace, pod, port))
        key = self.headers.get("Sec-WebSocket-Key")
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            self._send_json(400, _status(400, "port-forward needs a WebSocket upgrade"))
            return
        if target is None:
            self._send_json(404, _status(404, f"nothing listens on {pod}:{port}"))
            return
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.send_header("Sec-WebSocket-Protocol", "v4.channel.k8s.io")
        self.end_headers()
        self.wfile.flush()
        _relay(self.connection, port, target)
        self.close_connection = True


def _send_frame(sock: socket.socket, opcode: int, payload: bytes) -> None:
    header = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        header += bytes([n])
    elif n < 1 << 16:
        header += bytes([126]) + struct.pack("!H", n)
    else:
        header += bytes([127]) + struct.pack("!Q", n)
    sock.sendall(header + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = b""
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionError("websocket closed")
        chunks += chunk
    return chunks


def _recv_frame(sock: socket.socket) -> tuple[int, bytes]:
    first, second = _recv_exact(sock, 2)
    opcode = first & 0x0F
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", _recv_exact(sock, 2))[0]
    elif length == 127:
        length = struct.unpack("!Q", _recv_exact(sock, 8))[0]
    mask = _recv_exact(sock, 4) if second & 0x80 else b""
    payload = _recv_exact(sock, length)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return opcode, payload


def _relay(ws: socket.socket, port: int, target: tuple[str, int]) -> None:
    """Bridge a port-forward WebSocket and a TCP connection to ``target``."""
    port_bytes = struct.pack("<H", port)
    send_lock = threading.Lock()

    def send(opcode: int, payload: bytes) -> None:
        with send_lock:
            _send_frame(ws, opcode, payload)

    # The protocol opens with the port number on the data (0) and error (1) channels.
    send(_OP_BINARY, b"\x00" + port_bytes)
    send(_OP_BINARY, b"\x01" + port_bytes)
    upstream = socket.create_connection(target, timeout=5)
    upstream.settimeout(None)

    def pump_up() -> None:
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                send(_OP_BINARY, b"\x00" + data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            send(_OP_CLOSE, struct.pack("!H", 1000))

    up = threading.Thread(target=pump_up, name="fake-kube-forward", daemon=True)
    up.start()
    try:
        while True:
            opcode, payload = _recv_frame(ws)
            if opcode == _OP_CLOSE:
                break
            if opcode == _OP_PING:
                send(_OP_PONG, payload)
            elif opcode == _OP_BINARY and payload[:1] == b"\x00":
                upstream.sendall(payload[1:])
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_RDWR)
        upstream.close()
        up.join(timeout=5)
        linger(ws)
