"""Structured logs: one JSON object per line (or plain text for a terminal).

Every line carries ``ts``, ``level``, ``logger``, ``role`` and ``message``; the
``extra={...}`` fields of a log call follow as their own keys (JSON values kept,
anything else as its ``str``), and a traceback, when there is one, as
``traceback``. Extras never overwrite those core keys.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any, TextIO

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_CORE_KEYS = ("ts", "level", "logger", "role", "message", "traceback")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Infinity; keep the line parseable
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "role": self.role,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in _CORE_KEYS:
                entry[key] = _jsonable(value)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["traceback"] = record.exc_text
        return json.dumps(entry)


def configure_logging(
    role: str, level: str = "INFO", fmt: str = "json", stream: TextIO | None = None
) -> logging.Handler:
    """Send all logs to ``stream`` (stderr) in ``fmt``; returns the installed handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return handler
