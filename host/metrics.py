"""Prometheus metrics of the host, rendered in the text exposition format.

Kept in process, by hand: call counters by plugin and outcome, histograms of
call latency and of peak memory by plugin, per-plugin gauges (limits,
quarantine) and host gauges (queue depth, sandboxes running), read at scrape
time. The console reads the same figures (`figures()`), and estimates p50 and
p95 from the histogram buckets the way PromQL's `histogram_quantile` does.

Why not `prometheus-client` (`scripts/metrics_bench.py` measures both): on
this host's 2 cores, under load, one call's observations (a counter and two
histograms) cost 2.1 us here against 3.8 us with the library, and rendering
50 plugins 0.4 ms against 8 ms. Its multi-process mode solves a problem this
host does not have: the process that runs a call's sandbox observes it
(sandbox children never touch the metrics), and its mmap files cannot span
nodes anyway: each node of a multi-node deployment exports the calls it
ran and is scraped on its own, and Prometheus sums them. And the console
needs the raw bucket counts, which the library hands out only through
`collect()`.

Series are bounded: plugins are named by the operator's installation, and at
most `MAX_PLUGINS` distinct names get series of their own; any further name
is counted under `plugin="_other"`.

A client is shown the figures of its own calls only (`own`, `figures(plugin,
owner)`): they are kept apart by (plugin, owner), never exported, at most
`MAX_OWN_SERIES` pairs (the least recently used pair is dropped first).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MiB = 1024 * 1024
MEMORY_BUCKETS = tuple(mb * MiB for mb in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
MAX_PLUGINS = 512
MAX_OWN_SERIES = 8192
OTHER = "_other"
# Calls whose figures the console ranks for its percentiles, per plugin and
# per (plugin, client): 256 floats and 256 ints each, a few kB per series.
WINDOW = 256
# Outcomes of calls refused before anything ran: counted, but their 0 s is
# no latency and they have no peak.
UNTIMED = frozenset({"quarantined"})


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


@dataclass
class Histogram:
    """Cumulative bucket counts (Prometheus' `le` buckets), their sum and count."""

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.sum, self.count)

    def quantile(self, q: float) -> float | None:
        """Estimate the q-quantile (0 < q < 1) by linear interpolation inside
        the bucket it falls in, as PromQL's `histogram_quantile`; a quantile in
        the `+Inf` bucket is reported as the largest finite bound. None without
        observations."""
        if self.count == 0:
            return None
        rank = q * self.count
        lower, below = 0.0, 0
        for bound, cumulative in zip(self.bounds, self.counts, strict=True):
            if cumulative >= rank:
                inside = cumulative - below
                return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = bound, cumulative
        return float(self.bounds[-1])

    def lines(self, name: str, labels: str) -> list[str]:
        out = [
            f'{name}_bucket{{{labels},le="{bound}"}} {count}'
            for bound, count in zip(self.bounds, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {_number(self.sum)}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


def rank(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of `values` by nearest rank: the smallest
    value with at least a fraction q of the values at or below it, so always
    one that was observed (one value is its own p50 and p95). None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Recent:
    """The wall times and measured peaks of the last `WINDOW` calls."""

    seconds: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    peaks: deque[int] = field(default_factory=lambda: deque(maxlen=WINDOW))

    def add(self, seconds: float, peak_bytes: int | None) -> None:
        self.seconds.append(seconds)
        if peak_bytes is not None:
            self.peaks.append(peak_bytes)

    def copy(self) -> Recent:
        return Recent(deque(self.seconds, maxlen=WINDOW), deque(self.peaks, maxlen=WINDOW))


def _measured(peak_bytes: int | None) -> int | None:
    """A peak the sandbox measured, or None: a call whose process tree was
    never sampled reports 0, which no process has used."""
    return peak_bytes if peak_bytes is not None and peak_bytes > 0 else None


@dataclass
class PluginFigures:
    """One plugin's figures at one moment: calls by outcome, both histograms
    (what /metrics exports), and the recent calls' figures the percentiles
    are ranked from."""

    calls: dict[str, int]
    latency: Histogram
    memory: Histogram
    max_peak_bytes: int | None
    recent: Recent = field(default_factory=Recent)

    def latency_quantile(self, q: float) -> float | None:
        """Seconds: the q-quantile of the recent calls' wall times (`rank`)."""
        return rank(self.recent.seconds, q)

    def peak_quantile(self, q: float) -> float | None:
        """Bytes: the q-quantile of the recent measured peaks; None if none was."""
        return rank(self.recent.peaks, q)

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    @property
    def errors(self) -> int:
        return self.total - self.calls.get("success", 0)


@dataclass
class _Own:
    """One client's calls of one plugin."""

    calls: dict[str, int] = field(default_factory=dict)
    latency: Histogram = field(default_factory=lambda: Histogram(BUCKETS))
    memory: Histogram = field(default_factory=lambda: Histogram(MEMORY_BUCKETS))
    max_peak_bytes: int | None = None
    recent: Recent = field(default_factory=Recent)
    last_seconds: float | None = None
    last_used: str | None = None
    last_peak_bytes: int | None = None


def _ms_of(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


# A gauge with a `plugin` label: read at scrape time as {plugin: value}.
PluginGaugeRead = Callable[[], dict[str, float]]


class Metrics:
    """Thread-safe counters and histograms; `render()` gives the exposition text."""

    def __init__(self, max_plugins: int = MAX_PLUGINS) -> None:
        self._lock = threading.Lock()
        self.max_plugins = max_plugins
        self._calls: dict[tuple[str, str], int] = {}
        self._latency: dict[str, Histogram] = {}
        self._memory: dict[str, Histogram] = {}
        self._max_peak: dict[str, int] = {}
        self._recent: dict[str, Recent] = {}
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self._plugin_gauges: dict[str, tuple[str, PluginGaugeRead]] = {}
        self._own: OrderedDict[tuple[str, str], _Own] = OrderedDict()

    def _series(self, plugin: str) -> str:
        """The label `plugin` is counted under (caller holds the lock)."""
        if plugin in self._latency or len(self._latency) < self.max_plugins:
            return plugin
        return OTHER

    def observe_call(
        self, plugin: str, outcome: str, seconds: float, peak_bytes: int | None = None
    ) -> None:
        """Count one plugin call with its outcome (`success` or a reason), its
        wall time and, when the sandbox measured it, the peak memory of its
        process tree."""
        peak_bytes = _measured(peak_bytes)
        with self._lock:
            plugin = self._series(plugin)
            self._calls[(plugin, outcome)] = self._calls.get((plugin, outcome), 0) + 1
            self._latency.setdefault(plugin, Histogram(BUCKETS)).observe(seconds)
            if outcome not in UNTIMED:
                self._recent.setdefault(plugin, Recent()).add(seconds, peak_bytes)
            memory = self._memory.setdefault(plugin, Histogram(MEMORY_BUCKETS))
            if peak_bytes is not None:
                memory.observe(peak_bytes)
                self._max_peak[plugin] = max(self._max_peak.get(plugin, 0), peak_bytes)

    def observe_own(
        self,
        plugin: str,
        owner: str,
        outcome: str,
        seconds: float,
        peak_bytes: int | None = None,
    ) -> None:
        """Count one call of `plugin` made by `owner` (a principal id) apart
        from every other client's: what that client is shown (`own`)."""
        peak_bytes = _measured(peak_bytes)
        with self._lock:
            own = self._own.get((plugin, owner))
            if own is None:
                if len(self._own) >= MAX_OWN_SERIES:
                    self._own.popitem(last=False)
                own = self._own[(plugin, owner)] = _Own()
            self._own.move_to_end((plugin, owner))
            own.calls[outcome] = own.calls.get(outcome, 0) + 1
            own.latency.observe(seconds)
            if outcome not in UNTIMED:
                own.recent.add(seconds, peak_bytes)
            own.last_seconds = seconds
            own.last_used = datetime.now(UTC).isoformat()
            own.last_peak_bytes = peak_bytes
            if peak_bytes is not None:
                own.memory.observe(peak_bytes)
                own.max_peak_bytes = max(own.max_peak_bytes or 0, peak_bytes)

    def own(self, plugin: str, owner: str) -> dict[str, object]:
        """`owner`'s calls of `plugin` in the registry's shape (success and
        error counts, last and average time, when, last peak memory)."""
        with self._lock:
            own = self._own.get((plugin, owner)) or _Own()
            total = sum(own.calls.values())
            successes = own.calls.get("success", 0)
            return {
                "success_count": successes,
                "error_count": total - successes,
                "last_execution_time_ms": _ms_of(own.last_seconds),
                "avg_execution_time_ms": _ms_of(own.latency.sum / total) if total else None,
                "last_used": own.last_used,
                "last_peak_rss_mb": (
                    None if own.last_peak_bytes is None else round(own.last_peak_bytes / MiB, 1)
                ),
            }

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Register a gauge read at scrape time."""
        self._gauges[name] = (help_text, read)

    def plugin_gauge(self, name: str, help_text: str, read: PluginGaugeRead) -> None:
        """Register a gauge with a `plugin` label, read at scrape time as
        `{plugin: value}` (the reader bounds its own names: registered plugins)."""
        self._plugin_gauges[name] = (help_text, read)

    def calls(self, plugin: str, outcome: str) -> int:
        with self._lock:
            return self._calls.get((plugin, outcome), 0)

    def figures(self, plugin: str, owner: str | None = None) -> PluginFigures:
        """A copy of `plugin`'s figures (all zero for a plugin never called):
        every call's, or with `owner` only that client's."""
        if owner is not None:
            with self._lock:
                own = self._own.get((plugin, owner)) or _Own()
                return PluginFigures(
                    dict(own.calls),
                    own.latency.copy(),
                    own.memory.copy(),
                    own.max_peak_bytes,
                    own.recent.copy(),
                )
        with self._lock:
            return PluginFigures(
                calls={o: n for (p, o), n in self._calls.items() if p == plugin},
                latency=self._latency.get(plugin, Histogram(BUCKETS)).copy(),
                memory=self._memory.get(plugin, Histogram(MEMORY_BUCKETS)).copy(),
                max_peak_bytes=self._max_peak.get(plugin),
                recent=self._recent.get(plugin, Recent()).copy(),
            )

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
            for name, help_text, table in (
                ("plughost_plugin_call_seconds", "Wall time of plugin calls.", self._latency),
                (
                    "plughost_plugin_peak_memory_bytes",
                    "Peak memory of a plugin call's process tree.",
                    self._memory,
                ),
            ):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
                for plugin, histogram in sorted(table.items()):
                    lines += histogram.lines(name, f'plugin="{_label(plugin)}"')
        for name, (help_text, read_all) in sorted(self._plugin_gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            for plugin, value in sorted(read_all().items()):
                lines.append(f'{name}{{plugin="{_label(plugin)}"}} {_number(value)}')
        for gauge, (help_text, read) in sorted(self._gauges.items()):
            lines += [f"# HELP {gauge} {help_text}", f"# TYPE {gauge} gauge", f"{gauge} {read()}"]
        return "\n".join(lines) + "\n"
