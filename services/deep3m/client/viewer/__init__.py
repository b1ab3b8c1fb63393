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

Modules: ``server`` (the HTTP server: paths, ranges, CORS, the request log),
``state`` (layers, the Neuroglancer state and link), ``meshes`` (object surfaces),
``session`` (``Viewer``: the server running while open).
"""

from deep3m.client.viewer.meshes import mesh_fragments
from deep3m.client.viewer.server import RequestLog, client_dir, parse_range
from deep3m.client.viewer.session import Viewer, public_base
from deep3m.client.viewer.state import (
    Layer,
    LayerKind,
    default_layers,
    label_images,
    viewer_link,
    viewer_state,
)

__all__ = [
    "Layer",
    "LayerKind",
    "RequestLog",
    "Viewer",
    "client_dir",
    "default_layers",
    "label_images",
    "mesh_fragments",
    "parse_range",
    "public_base",
    "viewer_link",
    "viewer_state",
]
