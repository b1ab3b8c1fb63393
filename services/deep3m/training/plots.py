"""Loss and accuracy curves as a PNG, like CDeep3M's ``PlotValidation``.

Uses matplotlib's object API with the Agg canvas (no pyplot state, no display),
so it is safe in worker threads.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ACCURACY_KEYS = ("f1", "precision", "recall", "jaccard", "accuracy")


def _series(history: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for h in history:
        if key in h and "iteration" in h:
            xs.append(float(h["iteration"]))
            ys.append(float(h[key]))
    return xs, ys


def validation_plot(history: Sequence[Mapping[str, float]], title: str) -> bytes:
    """PNG bytes: training/validation loss (left) and validation accuracy (right)."""
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for key, label in (("loss", "training loss"), ("val_loss", "validation loss")):
        xs, ys = _series(history, key)
        if xs:
            left.plot(xs, ys, label=label, marker="o" if key == "val_loss" else None)
    left.set_xlabel("iteration")
    left.set_ylabel("loss")
    left.set_title("loss")
    if left.lines:
        left.legend(loc="upper right")
    for key in ACCURACY_KEYS:
        xs, ys = _series(history, key)
        if xs:
            right.plot(xs, ys, label=key, marker="o")
    right.set_xlabel("iteration")
    right.set_ylim(0, 1)
    right.set_title("validation")
    if right.lines:
        right.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
