#!/usr/bin/env python3
"""The host's hand-written metrics against prometheus-client, on this machine.

    pip install -e '.[bench]' && python scripts/metrics_bench.py

Prints the cost of one observation (a counter and two histograms, as every
plugin call makes) and of rendering the exposition text for 50 plugins.
Figures are printed, never asserted: they are the measurement behind keeping
`host/metrics.py` (its docstring quotes them).
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest  # noqa: E402

from host.metrics import BUCKETS, MEMORY_BUCKETS, Metrics  # noqa: E402

OBSERVATIONS = 200_000
RENDERS = 200
PLUGINS = 50


def main() -> int:
    ours = Metrics()
    registry = CollectorRegistry()
    histogram = Histogram(
        "plughost_plugin_call_seconds", "Wall time.", ["plugin"], registry=registry, buckets=BUCKETS
    )
    memory = Histogram(
        "plughost_plugin_peak_memory_bytes",
        "Peak memory.",
        ["plugin"],
        registry=registry,
        buckets=MEMORY_BUCKETS,
    )
    counter = Counter("plughost_plugin_calls", "Calls.", ["plugin", "outcome"], registry=registry)

    def library() -> None:
        counter.labels("image_info", "success").inc()
        histogram.labels("image_info").observe(0.03)
        memory.labels("image_info").observe(30 * 1024 * 1024)

    def hand_written() -> None:
        ours.observe_call("image_info", "success", 0.03, 30 * 1024 * 1024)

    per_ours = timeit.timeit(hand_written, number=OBSERVATIONS) / OBSERVATIONS * 1e6
    per_library = timeit.timeit(library, number=OBSERVATIONS) / OBSERVATIONS * 1e6
    for i in range(PLUGINS):
        ours.observe_call(f"p{i}", "success", 0.03, 30 * 1024 * 1024)
        counter.labels(f"p{i}", "success").inc()
        histogram.labels(f"p{i}").observe(0.03)
        memory.labels(f"p{i}").observe(30 * 1024 * 1024)
    render_ours = timeit.timeit(ours.render, number=RENDERS) / RENDERS * 1e3
    render_library = (
        timeit.timeit(lambda: generate_latest(registry), number=RENDERS) / RENDERS * 1e3
    )
    print("| | host/metrics.py | prometheus-client |")
    print("|---|---|---|")
    print(f"| one call observed | {per_ours:.2f} us | {per_library:.2f} us |")
    print(f"| /metrics for {PLUGINS} plugins | {render_ours:.2f} ms | {render_library:.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
