"""The host's metrics: histograms, quantile estimates from their buckets,
bounded series, and the exposition text."""

from __future__ import annotations

import pytest

from host.metrics import BUCKETS, MEMORY_BUCKETS, OTHER, WINDOW, Histogram, Metrics


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


def test_percentiles_rank_the_recorded_durations_exactly() -> None:
    metrics = Metrics()
    metrics.observe_call("p", "success", 1.049)
    metrics.observe_call("p", "success", 0.525)
    figures = metrics.figures("p")
    assert figures.latency_quantile(0.5) == 0.525 and figures.latency_quantile(0.95) == 1.049
    assert figures.latency.quantile(0.95) == pytest.approx(2.35)  # the bucket estimate
    metrics.observe_call("one", "success", 0.0123)
    assert metrics.figures("one").latency_quantile(0.5) == 0.0123
    assert metrics.figures("one").latency_quantile(0.95) == 0.0123
    assert metrics.figures("never").latency_quantile(0.5) is None


def test_the_window_of_recent_calls_is_bounded_per_plugin_and_per_owner() -> None:
    metrics = Metrics()
    for i in range(WINDOW + 10):
        metrics.observe_call("p", "success", float(i))
        metrics.observe_own("p", "client-a", "success", float(i))
    for figures in (metrics.figures("p"), metrics.figures("p", "client-a")):
        assert len(figures.recent.seconds) == WINDOW
        assert min(figures.recent.seconds) == 10.0  # the oldest went first
        assert figures.total == WINDOW + 10  # the counts are every call's
    metrics.observe_own("p", "client-b", "success", 0.5)
    assert metrics.figures("p", "client-b").latency_quantile(0.95) == 0.5


def test_refused_calls_and_unmeasured_peaks_are_not_figures() -> None:
    metrics = Metrics()
    metrics.observe_call("p", "crashed", 0.2, 0)  # a tree never sampled reports 0
    metrics.observe_call("p", "quarantined", 0.0)
    metrics.observe_own("p", "client-a", "crashed", 0.2, 0)
    for figures in (metrics.figures("p"), metrics.figures("p", "client-a")):
        assert figures.max_peak_bytes is None and figures.peak_quantile(0.95) is None
        assert figures.latency_quantile(0.5) == 0.2
    assert metrics.own("p", "client-a")["last_peak_rss_mb"] is None
    assert metrics.calls("p", "quarantined") == 1
