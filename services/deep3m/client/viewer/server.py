"""The viewer's loopback HTTP server: store keys with CORS and byte ranges, meshes,
the Neuroglancer client's files and its (empty) event stream."""

from __future__ import annotations

import importlib.util
import json
import mimetypes
import posixpath
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from deep3m.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from deep3m.core.store import Store, check_key

S3Access = Literal["proxy", "presign", "public"]
DATA_PREFIX = "/data/"
# The client finds its server's paths from ``/v/<token>/`` in its own URL.
TOKEN = "deep3m"
CLIENT_PREFIX = f"/v/{TOKEN}/"
EVENTS_PATH = f"/events/{TOKEN}"
MESH_PREFIX = "/meshes/"
LOOPBACK = "127.0.0.1"
# A pre-signed URL outlives any viewing session it is made for.
PRESIGN_SECONDS = 12 * 3600


def client_dir() -> Path:
    """The Neuroglancer client's files in the installed ``neuroglancer`` wheel."""
    spec = importlib.util.find_spec("neuroglancer")  # not imported: it pulls a web server
    if spec is None or not spec.submodule_search_locations:
        raise FailedPreconditionError(
            "the neuroglancer package is not installed (pip install neuroglancer)",
            field="neuroglancer",
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "static" / "client"
    if not (folder / "index.html").is_file():
        raise FailedPreconditionError(
            f"{folder} holds no Neuroglancer client (index.html)", field="neuroglancer"
        )
    return folder


def parse_range(header: str, size: int) -> tuple[int, int]:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` → [start, stop) within ``size``."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise InvalidArgumentError(f"unsupported Range {header!r}", field="Range")
    first, dash, last = spec.strip().partition("-")
    try:
        if not dash:
            raise ValueError
        if not first:  # a suffix: the last n bytes
            n = int(last)
            start, stop = max(0, size - n), size
        else:
            start = int(first)
            stop = min(size, int(last) + 1) if last else size
    except ValueError:
        raise InvalidArgumentError(f"malformed Range {header!r}", field="Range") from None
    if start >= size or stop <= start:
        raise InvalidArgumentError(f"Range {header!r} lies outside {size} bytes", field="Range")
    return start, stop


@dataclass
class RequestLog:
    """Paths the server answered, with their status, for checking what a browser read."""

    entries: list[tuple[str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, path: str, status: int) -> None:
        with self.lock:
            self.entries.append((path, status))

    def paths(self, status: int | None = None) -> list[str]:
        with self.lock:
            return [p for p, s in self.entries if status is None or s == status]


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: Store, client: Path, s3: S3Access) -> None:
        super().__init__(address, _Handler)
        self.store = store
        self.client = client.resolve()
        self.s3 = s3
        self.log = RequestLog()
        self.closing = threading.Event()
        self.hold_events = True
        # layer index → object id → legacy precomputed mesh fragment
        self.meshes: dict[str, dict[int, bytes]] = {}


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log records each answer; stderr stays quiet

    def _cors(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "Range")
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length")

    def _answer(
        self, status: int, body: bytes, headers: Mapping[str, str] | None = None, *, head: bool
    ) -> None:
        self.send_response(status)
        self._cors()
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.server.log.add(urlsplit(self.path).path, status)

    def do_OPTIONS(self) -> None:
        self._answer(HTTPStatus.NO_CONTENT, b"", head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, *, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        try:
            if path.startswith(DATA_PREFIX):
                self._data(path.removeprefix(DATA_PREFIX), head=head)
            elif path.startswith(MESH_PREFIX):
                self._mesh(path.removeprefix(MESH_PREFIX), head=head)
            elif path == EVENTS_PATH:
                self._events()
            elif path.startswith(CLIENT_PREFIX):
                self._static(path.removeprefix(CLIENT_PREFIX), head=head)
            elif path == "/":
                self._answer(HTTPStatus.FOUND, b"", {"Location": CLIENT_PREFIX}, head=head)
            else:
                raise NotFoundError(f"{path} is not served here", field="path")
        except NotFoundError as exc:
            self._answer(HTTPStatus.NOT_FOUND, exc.message.encode(), head=head)
        except InvalidArgumentError as exc:
            status = (
                HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE
                if exc.field == "Range"
                else HTTPStatus.BAD_REQUEST
            )
            self._answer(status, exc.message.encode(), head=head)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser gave up on this request

    def _data(self, key: str, *, head: bool) -> None:
        store = self.server.store
        key = check_key(key.rstrip("/"))
        if self.server.s3 == "presign":
            target = store.signed_url(key, PRESIGN_SECONDS)
            self._answer(HTTPStatus.TEMPORARY_REDIRECT, b"", {"Location": target}, head=head)
            return
        size = store.size(key)
        kind = "application/json" if key.endswith(".json") else "application/octet-stream"
        headers = {"Content-Type": kind, "Accept-Ranges": "bytes", "Cache-Control": "no-cache"}
        wanted = self.headers.get("Range")
        if wanted is None:
            self._answer(HTTPStatus.OK, b"" if head else store.read_bytes(key), headers, head=head)
            return
        start, stop = parse_range(wanted, size)
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        body = b"" if head else store.read_range(key, start, stop)
        self._answer(HTTPStatus.PARTIAL_CONTENT, body, headers, head=head)

    def _mesh(self, rest: str, *, head: bool) -> None:
        """Legacy precomputed meshes: ``<layer>/info``, ``<layer>/<id>:0``, ``<layer>/<id>``."""
        layer, _, name = rest.partition("/")
        meshes = self.server.meshes.get(layer)
        if meshes is None:
            raise NotFoundError(f"no meshes for layer {layer!r}", field="path")
        if name == "info":
            body = json.dumps({"@type": "neuroglancer_legacy_mesh"}).encode()
        elif name.endswith(":0") and name[:-2].isdigit() and int(name[:-2]) in meshes:
            body = json.dumps({"fragments": [name[:-2]]}).encode()
        elif name.isdigit() and int(name) in meshes:
            body = meshes[int(name)]
        else:
            raise NotFoundError(f"no mesh {name!r} in layer {layer}", field="path")
        self._answer(HTTPStatus.OK, body, {"Content-Type": "application/octet-stream"}, head=head)

    def _events(self) -> None:
        """The Python server's event stream, with no updates: the state is in the link."""
        self.send_response(HTTPStatus.OK)
        self._cors()
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b": deep3m\n\n")
        self.wfile.flush()
        self.server.log.add(EVENTS_PATH, HTTPStatus.OK)
        self.close_connection = True
        # Held open until the viewer closes, as the Python server holds it: a stream that
        # ends reads as a lost server (the client says so, and reconnects). Headless
        # screenshots end it at once, or the page would never finish loading.
        if self.server.hold_events:
            self.server.closing.wait()

    def _static(self, path: str, *, head: bool) -> None:
        name = posixpath.normpath("/" + path).lstrip("/") or "index.html"
        file = (self.server.client / name).resolve()
        if not file.is_relative_to(self.server.client) or not file.is_file():
            raise NotFoundError(f"{path} is not a file of the viewer", field="path")
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if file.suffix == ".wasm":
            kind = "application/wasm"
        self._answer(HTTPStatus.OK, file.read_bytes(), {"Content-Type": kind}, head=head)
