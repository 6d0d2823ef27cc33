"""Structured logs: one JSON object per line, with job id and plugin where known,
and the caller (`client`: a client token's configured name, else its
principal id) of the request a line was written for, from `CALLER`.

Identical lines are rate-limited (`RepeatFilter`): a flood of one message,
such as asyncio's accept errors when descriptors run out, costs a few lines
and a count of what was dropped, not the disk.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime

CONTEXT_FIELDS = (
    "job_id",
    "batch_id",
    "plugin",
    "status",
    "reason",
    "elapsed_ms",
    "dropped",
    "traceback",
)
# Who the current request is from, set once its caller is identified
# (`host.api.auth`): each request runs in a context of its own, and uvicorn
# writes its access line from it.
CALLER: ContextVar[str | None] = ContextVar("plughost_caller", default=None)


class RepeatFilter(logging.Filter):
    """Lets at most `limit` identical records (same logger, level and text)
    through per `interval_s`. The first record let through after some were
    dropped carries their number in `dropped`."""

    MAX_KEYS = 1000

    def __init__(
        self, limit: int, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.limit = limit
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        # (logger, level, text) -> [window start, records let through, records dropped]
        self._windows: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.interval_s:
                if len(self._windows) >= self.MAX_KEYS:
                    self._forget(now)
                dropped = int(window[2]) if window else 0
                self._windows[key] = [now, 1, 0]
                if dropped:
                    record.dropped = dropped
                return True
            if window[1] < self.limit:
                window[1] += 1
                if window[2]:
                    record.dropped, window[2] = int(window[2]), 0
                return True
            window[2] += 1
            return False

    def _forget(self, now: float) -> None:
        expired = [k for k, w in self._windows.items() if now - w[0] >= self.interval_s]
        for key in expired or list(self._windows):
            del self._windows[key]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        caller = CALLER.get()
        if caller is not None:
            entry["client"] = caller
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(
    level: str = "info", repeat_limit: int = 10, repeat_interval_s: float = 10.0
) -> None:
    """Send every log line, uvicorn's and asyncio's included, to stderr as JSON,
    at most `repeat_limit` identical lines per `repeat_interval_s`."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter(repeat_limit, repeat_interval_s))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
