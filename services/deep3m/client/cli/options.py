"""Options several commands share, each declared once as an ``Annotated`` alias.

A command takes one with its default in the signature, where Typer and readers
expect it: ``overwrite: OverwriteOption = False``, ``store: StoreOption = None``.
"""

from __future__ import annotations

from typing import Annotated

import typer

STORE_HELP = "Store URL or folder (default: DEEP3M_STORE_URL, else ./deep3m-data)."
VOLUME_HELP = "Volume path in the store (e.g. volumes/stack.zarr) or STORE_URL//PATH."
WORKERS_HELP = "Threads for blockwise work (0: the machine's cores, at most 4)."
THRESHOLD_DEFAULT = (
    " (default: the threshold chosen on validation, from the card of the model that "
    "predicted the volume; else 0.5)."
)

# Jobs and local commands alike.
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace a complete volume already at the output.")
]
WaitOption = Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the job until it ends.")]

# Labelling, on the cluster (submit-label, predict --postprocess) or here (label, evaluate).
ThresholdOption = Annotated[
    float, typer.Option("--threshold", help="Foreground probability, (0, 1].")
]
# None: the threshold of the card of the model that predicted the volume.
ModelThresholdOption = Annotated[
    float | None, typer.Option("--threshold", help="Foreground probability" + THRESHOLD_DEFAULT)
]
MinSizeOption = Annotated[
    int, typer.Option("--min-size", min=0, help="Drop (predicted) objects below this (voxels).")
]
ConnectivityOption = Annotated[
    int, typer.Option("--connectivity", help="1: faces, 2: +edges, 3: +corners.")
]
WatershedOption = Annotated[
    bool,
    typer.Option("--watershed/--no-watershed", help="Split touching objects (distance watershed)."),
]
LabelNameOption = Annotated[
    str, typer.Option("--name", help="Label image name (under <volume>/labels/).")
]

# Commands on the store.
StoreOption = Annotated[str | None, typer.Option("--store", help=STORE_HELP)]
WorkersOption = Annotated[int, typer.Option("--workers", min=0, help=WORKERS_HELP)]
ArrayOption = Annotated[
    str, typer.Option("--array", help="Array in the group (pyramid level); default 0.")
]
