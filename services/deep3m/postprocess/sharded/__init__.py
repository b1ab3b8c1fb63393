"""Postprocess at any scale: labelling as independent per-block tasks plus one small merge.

Stages, each a plain function that a scheduler task can run:

1. :mod:`.block` — per block: threshold, label (or split touching objects by
   watershed, with a halo), the labels on the block's faces and per-piece
   partial statistics (two small documents);
2. :mod:`.merge` — per block: equivalences across its upper seams from the
   face documents; then once: union-find over all equivalences into a global
   id map (cost grows with pieces and equivalences, never with voxels);
3. :mod:`.relabel` — per block: the same labelling again, mapped through the
   id map, written to the block's own label chunks;
4. :mod:`.table` — once: the object table reduced from the partial statistics;
   :mod:`.density` — counts per region, density profiles, size histograms.

Every stage is deterministic, so a retried task rewrites the same bytes.
:mod:`.pipeline` runs the stages in one process (tests, small volumes).
"""
