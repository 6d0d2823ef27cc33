"""The host's metrics: histograms, quantile estimates from their buckets,
bounded series, and the exposition text."""

from __future__ import annotations

import pytest

from host.metrics import BUCKETS, MEMORY_BUCKETS, OTHER, Histogram, Metrics


def test_quantiles_are_estimated_within_the_bucket_they_fall_in() -> None:
    histogram = Histogram(BUCKETS)
    for seconds in [0.002] * 50 + [0.07] * 45 + [3.0] * 5:
        histogram.observe(seconds)
    assert histogram.quantile(0.5) == pytest.approx(0.005)  # the 50th of 50 under 5 ms
    p95 = histogram.quantile(0.95)
    assert p95 is not None and 0.05 < p95 <= 0.1
    assert histogram.quantile(0.99) == pytest.approx(2.5 + 2.5 * 0.8)
    assert Histogram(BUCKETS).quantile(0.5) is None


def test_a_quantile_past_the_last_bound_is_the_last_bound() -> None:
    histogram = Histogram(BUCKETS)
    histogram.observe(1000.0)
    assert histogram.quantile(0.5) == BUCKETS[-1]


def test_series_are_bounded_however_many_plugin_names_arrive() -> None:
    metrics = Metrics(max_plugins=3)
    for i in range(10):
        metrics.observe_call(f"p{i}", "success", 0.01)
    text = metrics.render()
    assert 'plugin="p2"' in text and 'plugin="p3"' not in text
    assert metrics.calls(OTHER, "success") == 7
    metrics.observe_call("p0", "crashed", 0.02)  # a known name keeps its own series
    assert metrics.calls("p0", "crashed") == 1


def test_peak_memory_is_a_histogram_with_a_maximum() -> None:
    metrics = Metrics()
    metrics.observe_call("a", "success", 0.01, peak_bytes=30 * 1024 * 1024)
    metrics.observe_call("a", "memory_limit", 0.5, peak_bytes=70 * 1024 * 1024)
    metrics.observe_call("a", "quarantined", 0.0)  # no sandbox, no peak
    figures = metrics.figures("a")
    assert figures.total == 3 and figures.errors == 2
    assert figures.memory.count == 2 and figures.max_peak_bytes == 70 * 1024 * 1024
    text = metrics.render()
    assert 'plughost_plugin_peak_memory_bytes_count{plugin="a"} 2' in text
    le = MEMORY_BUCKETS[2]
    assert f'plughost_plugin_peak_memory_bytes_bucket{{plugin="a",le="{le}"}} 1' in text


def test_plugin_gauges_are_read_at_scrape_time_with_escaped_labels() -> None:
    metrics = Metrics()
    values = {'we"ird': 1.0}
    metrics.plugin_gauge("plughost_test_gauge", "A test gauge.", lambda: values)
    assert 'plughost_test_gauge{plugin="we\\"ird"} 1.0' in metrics.render()
    values['we"ird'] = 0.0
    assert 'plughost_test_gauge{plugin="we\\"ird"} 0.0' in metrics.render()
