"""The OME-Zarr label image: where labels live inside an image and how it is marked.

Labels of ``<image>`` go to ``<image>/labels/<name>``; the ``labels`` group
lists its label images and each one points back at its image (OME-Zarr 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from deep3m.core.errors import AlreadyExistsError, InvalidArgumentError
from deep3m.core.store import Store, check_key

LabelDtype = Literal["uint32", "uint64"]
DEFAULT_LABEL_NAME = "segmentation"


def check_labels_shape(source: Any, target: Any) -> None:
    """Labels are written voxel for voxel: the target has the 3-D source's shape."""
    if tuple(source.shape) != tuple(target.shape) or len(source.shape) != 3:
        raise InvalidArgumentError(
            f"labels shape {tuple(target.shape)} must equal the 3-D source shape "
            f"{tuple(source.shape)}",
            field="output",
        )


def labels_path_for(image_path: str, name: str = DEFAULT_LABEL_NAME) -> str:
    """``<image>/labels/<name>``: an OME-Zarr label image inside the image group."""
    if not name or "/" in name or name in (".", ".."):
        raise InvalidArgumentError(f"label name {name!r} must be one path segment", field="name")
    return f"{check_key(image_path)}/labels/{name}"


def _ome_attrs(group: Any) -> dict[str, Any]:
    raw: Any = group.attrs.asdict().get("ome")
    return dict(raw) if isinstance(raw, dict) else {}


def register_label_image(store: Store, image_path: str, name: str) -> None:
    import zarr

    group = zarr.open_group(store.zarr_store(f"{image_path}/labels"), mode="a")
    ome = _ome_attrs(group)
    names = list(ome.get("labels") or [])
    if name not in names:
        names.append(name)
    group.attrs["ome"] = {"version": "0.5", "labels": names}


def mark_label_image(store: Store, path: str) -> None:
    import zarr

    group = zarr.open_group(store.zarr_store(path), mode="r+")
    ome = _ome_attrs(group)
    ome["image-label"] = {"version": "0.5", "source": {"image": "../../"}}
    group.attrs["ome"] = ome


def prepare_labels_volume(
    store: Store,
    path: str,
    shape: Sequence[int],
    *,
    dtype: LabelDtype,
    voxel_size_nm: Sequence[float],
    chunk_shape: Sequence[int],
    shard_shape: Sequence[int] | None,
    source: str,
) -> Any:
    """Create (or replace a previous labels volume at) ``path``; never replaces an image."""
    if store.exists(f"{path}/zarr.json"):
        attrs = store.volume_info(path).attributes
        if attrs.get("kind") != "labels":
            raise AlreadyExistsError(
                f"{store.key_url(path)} exists and is not a labels volume; choose another output",
                field="output.path",
            )
    return store.create_volume(
        path, shape, dtype,
        voxel_size_nm=voxel_size_nm, chunk_shape=chunk_shape, shard_shape=shard_shape,
        overwrite=True, attributes={"kind": "labels", "source": source},
    )  # fmt: skip
