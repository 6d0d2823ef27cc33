"""Quarantine: a plugin that ends UNAVAILABLE several times in a row is
refused for a cool-down, so one broken plugin cannot keep eating sandboxes.

A success (or any outcome that is not UNAVAILABLE) ends the streak; an
operator can lift a quarantine early.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class _Record:
    streak: int = 0
    until: float = 0.0  # monotonic time the quarantine ends; 0: not quarantined
    total: int = 0  # how many times the plugin was quarantined


class QuarantineBook:
    """Per-plugin streaks of UNAVAILABLE outcomes; thread-safe."""

    def __init__(self, threshold: int = 3, cooldown_s: float = 60.0) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}

    def retry_after(self, plugin: str) -> float | None:
        """Seconds until `plugin` may run again, or None if it may run now."""
        with self._lock:
            record = self._records.get(plugin)
            if record is None or record.until == 0.0:
                return None
            remaining = record.until - time.monotonic()
            if remaining <= 0:
                record.until = 0.0
                record.streak = 0
                return None
            return remaining

    def record(self, plugin: str, unavailable: bool) -> bool:
        """Count one outcome; return True if it put the plugin in quarantine."""
        with self._lock:
            record = self._records.setdefault(plugin, _Record())
            if not unavailable:
                record.streak = 0
                return False
            record.streak += 1
            if record.streak >= self.threshold and record.until == 0.0:
                record.until = time.monotonic() + self.cooldown_s
                record.total += 1
                return True
            return False

    def reset(self, plugin: str) -> bool:
        """Lift a quarantine and clear the streak; return True if one was active."""
        with self._lock:
            record = self._records.get(plugin)
            active = record is not None and record.until > time.monotonic()
            if record is not None:
                record.until = 0.0
                record.streak = 0
            return active

    def status(self, plugin: str) -> dict[str, Any]:
        """`{"quarantined", "retry_after_s", "unavailable_streak", "times_quarantined"}`."""
        remaining = self.retry_after(plugin)
        with self._lock:
            record = self._records.get(plugin, _Record())
            return {
                "quarantined": remaining is not None,
                "retry_after_s": None if remaining is None else round(remaining, 1),
                "unavailable_streak": record.streak,
                "times_quarantined": record.total,
            }
