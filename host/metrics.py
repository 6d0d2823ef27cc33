"""Prometheus metrics of the host, rendered in the text exposition format.

Kept in process (no client library needed for three metric kinds): call
counters by plugin and outcome, call latency histograms by plugin, and
gauges read at scrape time (queue depth, sandboxes running).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Thread-safe counters and histograms; `render()` gives the exposition text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, str], int] = defaultdict(int)
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def observe_call(self, plugin: str, outcome: str, seconds: float) -> None:
        """Count one plugin call with its outcome (`success` or a reason)."""
        with self._lock:
            self._calls[(plugin, outcome)] += 1
            buckets = self._buckets.setdefault(plugin, [0] * len(BUCKETS))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            self._sums[plugin] += seconds
            self._counts[plugin] += 1

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Register a gauge read at scrape time."""
        self._gauges[name] = (help_text, read)

    def calls(self, plugin: str, outcome: str) -> int:
        with self._lock:
            return self._calls.get((plugin, outcome), 0)

    def render(self) -> str:
        lines = [
            "# HELP plughost_plugin_calls_total Plugin calls by outcome.",
            "# TYPE plughost_plugin_calls_total counter",
        ]
        with self._lock:
            for (plugin, outcome), count in sorted(self._calls.items()):
                lines.append(
                    f'plughost_plugin_calls_total{{plugin="{_label(plugin)}",'
                    f'outcome="{_label(outcome)}"}} {count}'
                )
            lines += [
                "# HELP plughost_plugin_call_seconds Wall time of plugin calls.",
                "# TYPE plughost_plugin_call_seconds histogram",
            ]
            for plugin, buckets in sorted(self._buckets.items()):
                name = _label(plugin)
                bucket = "plughost_plugin_call_seconds_bucket"
                for bound, count in zip(BUCKETS, buckets, strict=True):
                    lines.append(f'{bucket}{{plugin="{name}",le="{bound}"}} {count}')
                lines.append(
                    f'plughost_plugin_call_seconds_bucket{{plugin="{name}",le="+Inf"}} '
                    f"{self._counts[plugin]}"
                )
                lines.append(
                    f'plughost_plugin_call_seconds_sum{{plugin="{name}"}} {self._sums[plugin]}'
                )
                lines.append(
                    f'plughost_plugin_call_seconds_count{{plugin="{name}"}} {self._counts[plugin]}'
                )
        for gauge, (help_text, read) in sorted(self._gauges.items()):
            lines += [f"# HELP {gauge} {help_text}", f"# TYPE {gauge} gauge", f"{gauge} {read()}"]
        return "\n".join(lines) + "\n"
