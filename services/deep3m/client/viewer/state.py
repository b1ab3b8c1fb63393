"""What the viewer shows: layers, the Neuroglancer state and the link that carries it."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from deep3m.core.errors import Deep3mError, InvalidArgumentError
from deep3m.core.store import Store, check_key

LayerKind = Literal["image", "probabilities", "segmentation"]
# Segments listed (and so meshed on screen) in the link; more would bloat the URL.
MAX_LISTED_SEGMENTS = 500
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
