"""The reason table is the one source: the envelope, the HTTP status and
the quarantine read it, and docs/outcomes.md says what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from host.errors import envelope, status_of
from host.metrics import Metrics
from host.quarantine import QuarantineBook
from host.registry import PluginRegistry
from host.services.plugins import CallRecorder
from sandbox.call import ErrorMessage
from sandbox.envelope import Envelope, unknown_plugin
from sandbox.outcome import CHILD_REASONS, REASONS, State

DOC = Path(__file__).resolve().parents[2] / "docs" / "outcomes.md"


def _documented() -> dict[str, tuple[str, str]]:
    """reason -> (error type, HTTP column) from the tables of docs/outcomes.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        reasons = re.findall(r"`([a-z_]+)`", cells[2] if len(cells) > 3 else "")
        statuses = re.findall(r"\d{3}|n/a|\(in the job record\)", cells[-1]) if cells else []
        for i, reason in enumerate(reasons):
            status = statuses[min(i, len(statuses) - 1)] if statuses else ""
            rows[reason] = (cells[1], status)
    return rows


def test_the_outcomes_page_matches_the_reason_table() -> None:
    documented = _documented()
    assert set(documented) == set(REASONS)
    for reason, (error_type, status) in documented.items():
        assert REASONS[reason].error_type == error_type, reason
        if status.isdigit():
            assert REASONS[reason].http_status == int(status), reason


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_every_layer_reads_the_same_entry(reason: str) -> None:
    built = Envelope.of(envelope(reason, "message"))
    assert built.reason == reason and built.error_type == REASONS[reason].error_type
    assert envelope(reason, "message")["error"]["type"] == REASONS[reason].error_type
    assert status_of(reason) == REASONS[reason].http_status


def test_an_unknown_reason_reads_as_a_host_failure() -> None:
    assert status_of("no_such_reason") == 500
    assert Envelope.of({"error": {"details": {"reason": 7}}}).reason == "internal"
    assert Envelope.of({}).reason == "internal" and Envelope.of({"error": "x"}).message == ""


def test_envelope_round_trips_and_keeps_internal_out_of_its_public_part() -> None:
    built = Envelope.build("timeout", "first line\nsecond", "p", {"limit_s": 1}, "Traceback")
    wire = built.to_dict()
    assert wire["error"]["message"] == "first line"
    assert wire["error"]["details"] == {"reason": "timeout", "limit_s": 1}
    assert wire["_internal"] == {"traceback": "Traceback"}
    assert Envelope.of(wire) == built
    assert Envelope.of(wire["error"]).public() == built.public()
    assert "_internal" not in built.public()


def test_unknown_plugin_is_said_one_way() -> None:
    error = unknown_plugin("nope", ["a", "b"]).public()
    assert error["message"] == "no plugin named 'nope' is registered"
    assert error["details"] == {"reason": "unknown_plugin", "available": ["a", "b"]}
    with pytest.raises(KeyError) as info:
        PluginRegistry().get_plugin("nope")
    assert str(info.value) == error["message"]


def test_the_child_may_report_only_its_own_reasons() -> None:
    assert CHILD_REASONS == {
        "plugin_raised",
        "invalid_output",
        "output_too_large",
        "load_failed",
        "memory_limit",
    }
    fields = {"type": "error", "message": "m", "exc_type": "E", "traceback": ""}
    assert ErrorMessage(reason="plugin_raised", **fields).reason == "plugin_raised"
    with pytest.raises(ValueError, match="may not report"):
        ErrorMessage(reason="quarantined", **fields)


def test_a_call_is_recorded_once_in_registry_quarantine_and_metrics(
    registry: PluginRegistry,
) -> None:
    quarantine, metrics = QuarantineBook(threshold=2), Metrics()
    recorder = CallRecorder(registry, quarantine, metrics)
    recorder.update_execution_metrics("segfault", State.UNAVAILABLE, 5.0, True, reason="crashed")
    recorder.update_execution_metrics("segfault", None, 5.0, True, reason="cancelled")
    recorder.update_execution_metrics("segfault", State.UNAVAILABLE, 5.0, True, reason="crashed")
    status = registry.get_status("segfault")
    assert status["error_count"] == 3 and status["state"] == "UNAVAILABLE"
    assert metrics.calls("segfault", "crashed") == 2 and metrics.calls("segfault", "cancelled") == 1
    # A cancellation says nothing of the plugin's health: the streak went on.
    assert quarantine.retry_after("segfault") is not None
