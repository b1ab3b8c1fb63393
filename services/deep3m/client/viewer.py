"""Viewing volumes in Neuroglancer: a loopback HTTP server and the link that opens them.

The server answers two kinds of path. ``/data/<key>`` is a key of the store,
read through the store (so ``file://``, ``memory://`` and private ``s3://``
stores all work, with the caller's credentials never leaving this process),
with CORS and byte ranges: Neuroglancer reads sharded zarr v3 by range, the
shard index from the end (``bytes=-N``). Every other path is a file of the
Neuroglancer client shipped in the ``neuroglancer`` wheel. For an S3 store,
``presign`` answers data requests with a redirect to a pre-signed URL of the
object (the bucket must allow CORS), and ``public`` links the bucket directly.

The client in the wheel is the one the neuroglancer Python server serves, so
the server also answers its paths (``/v/<token>/`` for the client files,
``/events/<token>`` for state updates, which never come: the state is in the
link). The link's state shows each layer's OME-Zarr group (``zarr3://``), so
Neuroglancer reads the multiscale levels and voxel size itself; with meshes, a
segmentation layer also has a legacy precomputed mesh source served from memory.
"""

from __future__ import annotations

import importlib.util
import json
import mimetypes
import posixpath
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

import numpy as np

from deep3m.core.errors import (
    Deep3mError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from deep3m.core.store import Store, check_key

LayerKind = Literal["image", "probabilities", "segmentation"]
S3Access = Literal["proxy", "presign", "public"]
DATA_PREFIX = "/data/"
# The client finds its server's paths from ``/v/<token>/`` in its own URL.
TOKEN = "deep3m"
CLIENT_PREFIX = f"/v/{TOKEN}/"
EVENTS_PATH = f"/events/{TOKEN}"
MESH_PREFIX = "/meshes/"
# Segments listed (and so meshed on screen) in the link; more would bloat the URL.
MAX_LISTED_SEGMENTS = 500
LOOPBACK = "127.0.0.1"
# A pre-signed URL outlives any viewing session it is made for.
PRESIGN_SECONDS = 12 * 3600
# Probabilities in [0, 1] drawn in red over the image, transparent where 0.
PROBABILITY_SHADER = (
    "void main() {\n"
    "  float p = toNormalized(getDataValue());\n"
    "  emitRGBA(vec4(1.0, 0.1, 0.1, p * 0.8));\n"
    "}\n"
)


@dataclass(frozen=True)
class Layer:
    name: str
    path: str  # the volume's key in the store (an OME-Zarr group)
    kind: LayerKind

    def __post_init__(self) -> None:
        if self.kind not in ("image", "probabilities", "segmentation"):
            raise InvalidArgumentError(f"layer kind {self.kind!r} is unknown", field="kind")
        check_key(self.path)


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


class _Server(ThreadingHTTPServer):
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
    server: _Server
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


def viewer_state(
    layers: Sequence[Layer],
    data_url: Mapping[str, str],
    *,
    layout: str = "4panel",
    meshes: Mapping[str, tuple[str, Sequence[int]]] | None = None,
    shape: Sequence[int] = (),
    voxel_size_nm: Sequence[float] = (),
) -> dict[str, Any]:
    """Neuroglancer state showing ``layers``; ``data_url`` maps each path to its base URL,
    ``meshes`` a segmentation's path to its mesh source URL and the ids to show. With the
    image's (z, y, x) ``shape`` and voxel size, the view starts at the volume's centre."""
    entries: list[dict[str, Any]] = []
    for layer in layers:
        source: Any = f"zarr3://{data_url[layer.path].rstrip('/')}/"
        mesh = (meshes or {}).get(layer.path)
        if mesh is not None:
            source = [source, f"precomputed://{mesh[0]}"]
        entry: dict[str, Any] = {"type": "image", "source": source, "name": layer.name}
        if mesh is not None:
            entry["segments"] = [str(i) for i in list(mesh[1])[:MAX_LISTED_SEGMENTS]]
        if layer.kind == "probabilities":
            entry["shader"] = PROBABILITY_SHADER
        elif layer.kind == "segmentation":
            entry["type"] = "segmentation"
            entry["selectedAlpha"] = 0.4
        entries.append(entry)
    state: dict[str, Any] = {
        "layers": entries, "layout": layout, "selectedLayer": {"visible": False}
    }  # fmt: skip
    if shape and voxel_size_nm:
        # Named as the OME axes (and the meshes' x, y, z), so every source lines up.
        state["dimensions"] = {
            axis: [float(size) * 1e-9, "m"] for axis, size in zip("zyx", voxel_size_nm, strict=True)
        }
        state["position"] = [float(n) / 2 for n in shape]
    return state


def viewer_link(base_url: str, state: Mapping[str, Any]) -> str:
    return f"{base_url.rstrip('/')}/#!{quote(json.dumps(state, separators=(',', ':')), safe='')}"


def public_base(store: Store, storage_options: Mapping[str, Any] | None) -> str:
    """The HTTP URL of an S3 store's root for anonymous reads (``--public``)."""
    if store.scheme != "s3":
        raise InvalidArgumentError(
            f"--public needs an s3:// store, not {store.url}", field="public"
        )
    options = dict(storage_options or {})
    client_kwargs = options.get("client_kwargs") or {}
    endpoint = str(client_kwargs.get("endpoint_url") or options.get("endpoint_url") or "")
    bucket_and_prefix = store.url.removeprefix("s3://")
    if not endpoint:
        bucket, _, prefix = bucket_and_prefix.partition("/")
        return f"https://{bucket}.s3.amazonaws.com/{prefix}".rstrip("/")
    return f"{endpoint.rstrip('/')}/{bucket_and_prefix}"


class Viewer:
    """The store served on loopback while open; ``link`` opens ``layers`` in it."""

    def __init__(
        self,
        store: Store,
        layers: Sequence[Layer],
        *,
        port: int = 0,
        s3: S3Access = "proxy",
        storage_options: Mapping[str, Any] | None = None,
        hold_events: bool = True,
        meshes: bool = False,
    ) -> None:
        if not layers:
            raise InvalidArgumentError("nothing to view: no layers", field="volume")
        if s3 != "proxy" and store.scheme != "s3":
            raise InvalidArgumentError(f"--{s3} needs an s3:// store, not {store.url}", field=s3)
        if not 0 <= port < 65536:
            raise InvalidArgumentError(f"port must lie in 0..65535, got {port}", field="port")
        for layer in layers:
            if not store.exists(f"{layer.path}/zarr.json"):
                raise NotFoundError(
                    f"{store.key_url(layer.path)} is not a volume (no zarr.json)",
                    field=layer.name,
                )
        self.store = store
        self.layers = tuple(layers)
        self.s3: S3Access = s3
        self._public = public_base(store, storage_options) if s3 == "public" else ""
        try:
            self._server = _Server((LOOPBACK, port), store, client_dir(), s3)
        except OSError as exc:
            raise FailedPreconditionError(
                f"cannot listen on {LOOPBACK}:{port}: {exc}", field="port"
            ) from exc
        if meshes:
            for index, layer in enumerate(self.layers):
                if layer.kind == "segmentation":
                    self._server.meshes[str(index)] = mesh_fragments(store, layer.path)
        self._server.hold_events = hold_events
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="deep3m-viewer", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log(self) -> RequestLog:
        return self._server.log

    def data_url(self, path: str) -> str:
        if self._public:
            return f"{self._public}/{check_key(path)}"
        return f"{self.url}{DATA_PREFIX}{quote(check_key(path))}"

    @property
    def state(self) -> dict[str, Any]:
        meshes = {
            self.layers[int(i)].path: (f"{self.url}{MESH_PREFIX}{i}", sorted(found))
            for i, found in self._server.meshes.items()
        }
        urls = {lay.path: self.data_url(lay.path) for lay in self.layers}
        info = self.store.volume_info(self.layers[0].path)
        return viewer_state(
            self.layers, urls, meshes=meshes, shape=info.shape, voxel_size_nm=info.voxel_size_nm
        )

    @property
    def link(self) -> str:
        return viewer_link(f"{self.url}{CLIENT_PREFIX}", self.state)

    def close(self) -> None:
        self._server.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> Viewer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mesh_fragments(store: Store, path: str) -> dict[int, bytes]:
    """Each object's surface (marching cubes, ``zmesh``) as a legacy precomputed mesh
    fragment, vertices in nm (x, y, z). Reads the whole label volume: for volumes that
    fit in memory."""
    try:
        import zmesh
    except ImportError as exc:
        raise FailedPreconditionError(
            "--meshes needs the zmesh package (pip install zmesh)", field="meshes"
        ) from exc
    info = store.volume_info(path)
    labels = np.asarray(store.open_volume(path)[:])
    vz, vy, vx = info.voxel_size_nm
    mesher = zmesh.Mesher((vx, vy, vz))
    mesher.mesh(labels.T)  # zmesh takes (x, y, z)
    fragments: dict[int, bytes] = {}
    for object_id in mesher.ids():
        mesh = mesher.get(object_id, normals=False)
        fragments[int(object_id)] = bytes(mesh.to_precomputed())
    mesher.clear()
    return fragments


def label_images(store: Store, path: str) -> list[str]:
    """Keys of the OME-Zarr label images listed under ``<path>/labels``."""
    key = f"{check_key(path)}/labels"
    if not store.exists(f"{key}/zarr.json"):
        return []
    try:
        meta = store.read_json(f"{key}/zarr.json")
    except Deep3mError:
        return []
    names = (
        meta.get("attributes", {}).get("ome", {}).get("labels", [])
        if isinstance(meta, dict)
        else []
    )
    return [f"{key}/{n}" for n in names if isinstance(n, str) and n]


def default_layers(
    store: Store,
    image: str,
    *,
    probabilities: str = "",
    segmentation: Sequence[str] = (),
) -> list[Layer]:
    """The image, its probabilities and segmentations: those named, else the label
    images found inside the image and the probabilities."""
    layers = [Layer("image", check_key(image), "image")]
    if probabilities:
        layers.append(Layer("probabilities", check_key(probabilities), "probabilities"))
    found = list(segmentation) or [
        k for p in (image, probabilities) if p for k in label_images(store, p)
    ]
    for i, key in enumerate(dict.fromkeys(check_key(k) for k in found)):
        name = "segmentation" if i == 0 else f"segmentation {posixpath.basename(key)}"
        layers.append(Layer(name, key, "segmentation"))
    return layers
