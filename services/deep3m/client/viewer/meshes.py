"""Object surfaces of a label volume as legacy precomputed mesh fragments."""

from __future__ import annotations

import numpy as np

from deep3m.core.errors import FailedPreconditionError
from deep3m.core.store import Store


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
