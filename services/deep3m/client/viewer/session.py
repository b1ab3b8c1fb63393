"""``Viewer``: the store served on loopback while open, and the link to its layers."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from deep3m.client.viewer.meshes import mesh_fragments
from deep3m.client.viewer.server import (
    CLIENT_PREFIX,
    DATA_PREFIX,
    LOOPBACK,
    MESH_PREFIX,
    RequestLog,
    S3Access,
    ViewerServer,
    client_dir,
)
from deep3m.client.viewer.state import Layer, viewer_link, viewer_state
from deep3m.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from deep3m.core.store import Store, check_key


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
            self._server = ViewerServer((LOOPBACK, port), store, client_dir(), s3)
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
