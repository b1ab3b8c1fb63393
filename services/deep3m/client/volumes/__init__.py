"""Volume operations behind the ``deep3m`` command line, run in this process.

Each function acts on volumes in a store through the plain postprocess and
core modules and returns a JSON-ready report (lists, numbers, strings and
None only), which the CLI prints as text or as one JSON object. Failures are
``Deep3mError`` subclasses whose message names the offending volume, option or
value.

Modules: ``refs`` (stores and volume references, JSON-ready values, defaults),
``describe`` (describing a volume, listing models), ``analysis`` (label,
evaluate, pyramid: blockwise work over whole volumes), ``export`` (slices to
TIFF, PNG and overlays).
"""

from deep3m.client.volumes.analysis import evaluate, label, pyramid
from deep3m.client.volumes.describe import describe_volume, list_models
from deep3m.client.volumes.export import MAX_SLICES, export, parse_slices
from deep3m.client.volumes.refs import (
    Progress,
    default_threshold,
    default_workers,
    jsonable,
    open_existing_store,
    resolve,
    split_ref,
)

__all__ = [
    "MAX_SLICES",
    "Progress",
    "default_threshold",
    "default_workers",
    "describe_volume",
    "evaluate",
    "export",
    "jsonable",
    "label",
    "list_models",
    "open_existing_store",
    "parse_slices",
    "pyramid",
    "resolve",
    "split_ref",
]
