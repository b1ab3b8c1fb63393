"""Watershed splitting of touching objects, one block at a time.

The block is read with a halo; the Euclidean distance transform of the mask
(in units of the finest voxel size) is flooded from its h-maxima (peaks at
least ``h`` higher than their surroundings), and the core is kept. Each basin
remembers its seed by the seed's global position, so blocks that see the same
seed in their halo give its basin the same identity, and the join step ties
pieces by seed instead of by contact: touching pieces with different seeds
stay apart (the split survives block faces), and a piece whose seed lies
beyond the halo joins only its largest-contact neighbour. This approximates
one watershed over the whole volume: basins near a block face see only the
halo's context, so objects wider than the halo may be split or joined
differently (choose a halo about the object radius).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from deep3m.core.geometry import Box


def watershed_block(
    mask: np.ndarray,
    read: Box,
    core: Box,
    volume: Box,
    *,
    connectivity: int,
    h: float,
    sampling: Sequence[float],
) -> tuple[np.ndarray, int, np.ndarray]:
    """Watershed of ``mask`` (the foreground of ``read``), kept on ``core``.

    Returns the core's local labels 1..n (int64), n, and each label's seed key:
    the global linear index (in ``volume``) of its seed's first voxel, -1 when
    it had no seed.
    """
    inner = core.relative_to(read)
    if not mask[inner].any():
        return np.zeros(core.shape, np.int64), 0, np.zeros(0, np.int64)
    structure = ndimage.generate_binary_structure(3, connectivity)
    distance = ndimage.distance_transform_edt(mask, sampling=sampling)
    peaks = h_maxima(distance, h).astype(bool) & mask
    markers, n_markers = ndimage.label(peaks, structure=np.ones((3, 3, 3), bool))
    segments = watershed(-distance, markers, mask=mask, connectivity=connectivity)
    seeds = np.full(n_markers + 1, -1, np.int64)
    if n_markers:
        where = np.nonzero(markers)
        linear = np.ravel_multi_index(
            tuple(w + o for w, o in zip(where, read.start, strict=True)), volume.shape
        )
        first = np.full(n_markers + 1, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(first, markers[where], linear)
        seeds[1:] = first[1:]
    # Components too shallow to hold an h-maximum get no seed; keep them whole.
    unseeded = mask & (segments == 0)
    if unseeded.any():
        extra, n_extra = ndimage.label(unseeded, structure=structure)
        segments = np.where(unseeded, extra + n_markers, segments)
        seeds = np.concatenate([seeds, np.full(n_extra, -1, np.int64)])
    ids, inverse = np.unique(segments[inner], return_inverse=True)
    local = inverse.reshape(core.shape)
    if ids[0] != 0:
        local = local + 1
    present = ids[ids != 0]
    return local, len(present), seeds[present]


def watershed_joins(
    pairs: np.ndarray, contact: np.ndarray, seed: np.ndarray, pieces: int
) -> np.ndarray:
    """Edges of the join graph for watershed pieces.

    Pieces grown from the same seed are one object, whichever blocks they lie
    in: each is tied to a node standing for its seed (ids after the pieces).
    Touching seeded pieces with different seeds stay apart — that is the split.
    A piece without a seed (its peak lies beyond the halo) joins only the
    neighbour it shares the largest contact with, so it cannot glue two
    objects together.
    """
    edges = []
    seeded = np.flatnonzero(seed[1:] >= 0) + 1
    if len(seeded):
        _, node = np.unique(seed[seeded], return_inverse=True)
        edges.append(np.stack([seeded, pieces + 1 + node], axis=1))
    if len(pairs):
        ends = np.concatenate([pairs, pairs[:, ::-1]])
        weight = np.concatenate([contact, contact])
        loose = seed[ends[:, 0]] < 0
        ends, weight = ends[loose], weight[loose]
        order = np.lexsort((ends[:, 1], -weight, ends[:, 0]))
        ends = ends[order]
        first = np.ones(len(ends), bool)
        first[1:] = ends[1:, 0] != ends[:-1, 0]
        edges.append(ends[first])
    return np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)
