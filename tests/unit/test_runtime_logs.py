"""Structured JSON logs."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from deep3m.runtime.logs import JsonFormatter, configure_logging


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("postprocess"))
    logger = logging.getLogger("deep3m.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_object_per_line_with_core_fields(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = capture
    logger.info("labelled %d objects", 12)
    logger.warning("second line")
    first, second = _lines(stream)
    assert first["message"] == "labelled 12 objects"
    assert first["level"] == "info"
    assert first["role"] == "postprocess"
    assert first["logger"] == "deep3m.test.logs"
    assert str(first["ts"]).endswith("Z")
    assert second["level"] == "warning"


def test_extras_become_fields(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    logger.info(
        "block done",
        extra={
            "job_id": "j1",
            "voxels": 4096,
            "ratio": 0.5,
            "ok": True,
            "shape": (8, 64, 64),
            "where": {"z": 1},
            "nan": float("nan"),
            "obj": object(),
        },
    )
    (entry,) = _lines(stream)
    assert entry["job_id"] == "j1"
    assert entry["voxels"] == 4096
    assert entry["ratio"] == 0.5
    assert entry["ok"] is True
    assert entry["shape"] == [8, 64, 64]
    assert entry["where"] == {"z": 1}
    assert entry["nan"] == "nan"
    assert str(entry["obj"]).startswith("<object object")


def test_extras_do_not_overwrite_core_fields(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    logger.info("hello", extra={"level": "fake", "ts": "fake"})
    (entry,) = _lines(stream)
    assert entry["level"] == "info" and entry["ts"] != "fake"


def test_exceptions_carry_the_traceback(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    try:
        raise KeyError("missing-key-7")
    except KeyError:
        logger.exception("failed")
    (entry,) = _lines(stream)
    assert entry["level"] == "error"
    assert "Traceback" in str(entry["traceback"])
    assert "missing-key-7" in str(entry["traceback"])


def test_configure_logging_routes_the_root_logger() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure_logging("tiling", "warning", "json", stream=stream)
        logging.getLogger("deep3m.anything").info("dropped below the level")
        logging.getLogger("deep3m.anything").warning("kept", extra={"n": 1})
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    (entry,) = _lines(stream)
    assert entry["message"] == "kept" and entry["role"] == "tiling" and entry["n"] == 1


def test_console_format_is_plain_text() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure_logging("scheduler", "INFO", "console", stream=stream)
        logging.getLogger("deep3m.x").info("plain")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    line = stream.getvalue().strip()
    assert line.endswith("scheduler INFO deep3m.x: plain")
