"""Log lines: identical records are rate-limited, and the next one let through
says how many were dropped."""

from __future__ import annotations

import json
import logging

from host.logs import CALLER, JsonFormatter, RepeatFilter


def record(message: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("asyncio", level, __file__, 1, message, None, None)


def test_a_flood_of_one_line_is_cut_to_the_limit_then_counted() -> None:
    now = [0.0]
    repeat = RepeatFilter(limit=3, interval_s=10.0, clock=lambda: now[0])
    flood = "socket.accept() out of system resource"
    passed = [repeat.filter(record(flood)) for _ in range(1000)]
    assert sum(passed) == 3
    assert repeat.filter(record("another line"))  # other lines are not held back
    now[0] = 10.0
    after = record(flood)
    assert repeat.filter(after) and after.dropped == 997


def test_same_text_at_another_level_or_logger_is_another_line() -> None:
    repeat = RepeatFilter(limit=1, interval_s=10.0, clock=lambda: 0.0)
    assert repeat.filter(record("x")) and not repeat.filter(record("x"))
    assert repeat.filter(record("x", logging.WARNING))
    other = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "x", None, None)
    assert repeat.filter(other)


def test_the_filter_forgets_old_lines_instead_of_growing() -> None:
    now = [0.0]
    repeat = RepeatFilter(limit=1, interval_s=1.0, clock=lambda: now[0])
    for i in range(5 * RepeatFilter.MAX_KEYS):
        now[0] = i / 1000
        repeat.filter(record(f"line {i}"))
    assert len(repeat._windows) <= RepeatFilter.MAX_KEYS


def test_a_line_written_for_a_request_names_its_caller() -> None:
    line = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, "GET /v1/jobs", None, None
    )
    assert "client" not in json.loads(JsonFormatter().format(line))
    reset = CALLER.set("alice")
    try:
        assert json.loads(JsonFormatter().format(line))["client"] == "alice"
    finally:
        CALLER.reset(reset)
