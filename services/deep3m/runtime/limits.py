"""Limits every request must keep, checked once at the boundary for every service.

The interceptor runs ``check_request`` on each unary request before the servicer
sees it: strings are bounded (``MAX_STRING_CHARS``; a job's ``name``
``MAX_NAME_CHARS``; free-text ``message`` fields ``MAX_MESSAGE_CHARS``), lists
and maps hold at most ``MAX_ITEMS`` entries, and floating-point fields are
finite (NaN or infinite voxel sizes, thresholds, rates are refused). Metric
maps may carry NaN (a diverging loss is a fact to report, not a mistake). The
error names the field by its path (``spec.predict.output.path``) and never
echoes the offending value; ``clip`` shortens values that messages do echo.
"""

from __future__ import annotations

import math
import re
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from deep3m.core.errors import InvalidArgumentError, clip

MAX_STRING_CHARS = 1024
MAX_NAME_CHARS = 256
MAX_MESSAGE_CHARS = 16384
MAX_ITEMS = 1024
MAX_DEPTH = 8
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
_LONG_TEXT = frozenset({"message"})
_FREE_FLOAT_MAPS = frozenset({"metrics"})


_INDEX = re.compile(r"\[[^\]]*\]")
_SPEC_PREFIX = re.compile(r"^spec\.(?:(?:predict|train|ingest)\.)?")


def _field(path: str) -> str:
    """The field as the job kinds name it: ``output.path``, not ``spec.predict.output.path``."""
    return _INDEX.sub("", _SPEC_PREFIX.sub("", path))


def _string_limit(name: str, path: str) -> int:
    if name in _LONG_TEXT:
        return MAX_MESSAGE_CHARS
    if path == "spec.name":
        return MAX_NAME_CHARS
    return MAX_STRING_CHARS


def _check_scalar(fd: FieldDescriptor, value: Any, path: str) -> None:
    if fd.type == FieldDescriptor.TYPE_STRING:
        limit = _string_limit(fd.name, path)
        if len(value) > limit:
            raise InvalidArgumentError(
                f"{path} is {len(value)} characters long; at most {limit} are allowed",
                field=_field(path),
            )
        if "\x00" in value:  # no path, id or URL holds one; file APIs choke on it
            raise InvalidArgumentError(f"{path} contains a NUL character", field=_field(path))
    elif fd.type == FieldDescriptor.TYPE_BYTES:
        if len(value) > MAX_MESSAGE_CHARS:
            raise InvalidArgumentError(
                f"{path} is {len(value)} bytes long; at most {MAX_MESSAGE_CHARS}",
                field=_field(path),
            )
    elif fd.type in _FLOATS and not math.isfinite(value):
        raise InvalidArgumentError(
            f"{path} must be a finite number, got {value}", field=_field(path)
        )


def check_message(message: Message, path: str = "", depth: int = 0) -> None:
    """Raise ``InvalidArgumentError`` naming the first field over a limit."""
    if depth > MAX_DEPTH:
        raise InvalidArgumentError(f"{path or 'request'} is nested too deeply", field=_field(path))
    for fd, value in message.ListFields():
        where = f"{path}.{fd.name}" if path else fd.name
        entry = fd.message_type
        is_map = entry is not None and entry.GetOptions().map_entry
        if fd.is_repeated:
            if len(value) > MAX_ITEMS:
                raise InvalidArgumentError(
                    f"{where} has {len(value)} entries; at most {MAX_ITEMS} are allowed",
                    field=_field(where),
                )
            if is_map and entry is not None:
                key_fd, value_fd = entry.fields_by_name["key"], entry.fields_by_name["value"]
                for key, item in value.items():
                    _check_scalar(key_fd, key, f"{where} key")
                    if value_fd.message_type is not None:
                        check_message(item, f"{where}[{clip(key, 32)}]", depth + 1)
                    elif fd.name not in _FREE_FLOAT_MAPS or value_fd.type not in _FLOATS:
                        _check_scalar(value_fd, item, f"{where}[{clip(key, 32)}]")
                continue
            for i, item in enumerate(value):
                if fd.message_type is not None:
                    check_message(item, f"{where}[{i}]", depth + 1)
                else:
                    _check_scalar(fd, item, f"{where}[{i}]")
        elif fd.message_type is not None:
            check_message(value, where, depth + 1)
        else:
            _check_scalar(fd, value, where)


def check_request(request: object) -> None:
    """``check_message`` for a unary request; anything else passes."""
    if isinstance(request, Message):
        check_message(request)
