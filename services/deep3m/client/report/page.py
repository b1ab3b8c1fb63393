"""HTML pieces of the report: escaping, numbers, tables, figures embedded as
``data:`` URIs, the style sheet."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, list | tuple):
        return " × ".join(fmt(v) for v in value)
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def embedded_png(png: bytes, file: str, caption: str, *, alt: str = "") -> str:
    """A figure holding ``png`` itself (the page alone shows it); ``file`` names the copy
    beside the page, relative to it."""
    data = base64.b64encode(png).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(alt or caption)}" '
        f'data-file="{escape(file)}"><figcaption>{escape(caption)}</figcaption></figure>'
    )


def figure(folder: Path, name: str, png: bytes, caption: str) -> str:
    """``png`` written to ``folder/name`` and embedded in the page."""
    (folder / name).write_bytes(png)
    return embedded_png(png, name, caption)


STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ccc; }
.note { color: #666; font-size: 0.9em; }
"""
