"""Every outcome of SPEC section 4 that the sandbox produces, one hostile
plugin each (the seed of the crash-suite corpus in plugins/hostile)."""

from __future__ import annotations

import time

import pytest

from host.discovery import find_plugins
from host.registry import PluginRegistry
from sandbox.outcome import REASONS
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner
from tests.conftest import HOSTILE_DIR

ALL_CASES, _ = find_plugins(HOSTILE_DIR)
ACTIVE = Sandbox().protections()
# A case whose defence needs a layer this host lacks is the crash suite's to
# report as "not defended here" (tests/host/test_crashsuite.py checks that).
CASES = [c for c in ALL_CASES if all(ACTIVE.get(r) for r in c.manifest.expect.get("requires", []))]
# The verdict must come within the wall-clock limit plus this much.
VERDICT_SLACK_S = 0.5


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case_gets_its_expected_envelope(
    case, runner: ToolRunner, payload: dict, registry: PluginRegistry
) -> None:
    expected = case.manifest.expect["outcome"]
    limit = runner.limits.clamp(case.manifest.plugin_limits).timeout_s
    started = time.monotonic()
    result, error = runner.run(case.name, payload)
    took = time.monotonic() - started
    if error:
        observed = f"{error['error']['type']}:{error['error']['details']['reason']}"
    else:
        observed = "success"
    assert observed in expected, error
    assert took <= limit + VERDICT_SLACK_S
    assert bool(result) != bool(error)
    state = registry.get_status(case.name)["state"]
    if observed == "success":
        assert state == "SUCCESS"
    else:
        reason = error["error"]["details"]["reason"]
        assert state == REASONS[reason].state.value
        assert error["error"]["details"]["elapsed_ms"] >= 0


def test_corpus_covers_every_sandbox_reason() -> None:
    seen = {o.split(":")[1] for c in CASES for o in c.manifest.expect["outcome"] if ":" in o}
    sandbox_reasons = {
        "plugin_raised",
        "invalid_output",
        "output_too_large",
        "load_failed",
        "timeout",
        "memory_limit",
        "crashed",
        "protocol_violation",
    }
    assert sandbox_reasons <= seen


def test_crash_reports_the_signal_name(runner: ToolRunner, payload: dict) -> None:
    _, error = runner.run("segfault", payload)
    assert error["error"]["details"]["signal"] == "SIGSEGV"


def test_exit_without_reply_reports_the_exit_code(runner: ToolRunner, payload: dict) -> None:
    _, error = runner.run("exit_zero", payload)
    assert error["error"]["details"]["exit_code"] == 0
    _, error = runner.run("exit_three", payload)
    assert error["error"]["details"]["exit_code"] == 3


def test_memory_limit_reports_limit_and_peak(runner: ToolRunner, payload: dict) -> None:
    _, error = runner.run("memory_in_grandchildren", payload)
    details = error["error"]["details"]
    assert details["limit_mb"] == 128
    if details.get("enforced_by") == "cgroup":
        # The kernel stopped it at the cgroup: it never got 10% past the limit.
        assert 0 < details["peak_rss_mb"] <= 128 * 1.1
    else:
        assert details["peak_rss_mb"] > 128  # the watchdog saw it cross


@pytest.mark.parametrize("case", ["slow_growth", "memory_in_threads", "memory_in_grandchildren"])
def test_a_memory_bombs_peak_is_what_its_limit_counts(
    runner: ToolRunner, payload: dict, case: str
) -> None:
    # A process's maximum RSS also counts the pages of the interpreter and its
    # libraries, which the host loaded and no call is charged for (about 17 MB
    # of a Python process): where a memory cgroup counts the call, the peak a
    # client is shown is the cgroup's count, which its limit bounds.
    _, error = runner.run(case, payload)
    details = error["error"]["details"]
    assert details["reason"] == "memory_limit" and details["limit_mb"] == 128
    if runner.sandbox.protections()["cgroup_memory"]:
        assert 0 < details["peak_rss_mb"] <= 128 * 1.05 + 1, details
        assert details["cgroup_peak_mb"] <= 128 * 1.05 + 1, details
    else:
        assert details["peak_rss_mb"] > 128  # the watchdog saw it cross


def test_timeout_reports_the_limit(runner: ToolRunner, payload: dict) -> None:
    _, error = runner.run("busy_loop", payload)
    details = error["error"]["details"]
    assert details["limit_s"] == 1
    assert 1000 <= details["elapsed_ms"] < 1000 + VERDICT_SLACK_S * 1000


def test_plugin_output_is_captured_apart_from_the_protocol(
    runner: ToolRunner, payload: dict
) -> None:
    result, error = runner.run("stderr_chatter", payload)
    assert error == {} and result == {"ok": True}
    _, error, measured = runner.measure("stdout_flood", payload)
    details = error["error"]["details"]
    assert details["reason"] == "output_too_large" and details["stream"] == "stdout"
    assert "stdout_tail" not in details  # what it printed is its author's, not the client's
    assert 0 < len(measured["output"]["stdout"]) <= 64 * 1024 + 100


def test_pickled_reply_is_never_unpickled(runner: ToolRunner, payload: dict) -> None:
    import os

    _, error = runner.run("pickle_payload", payload)
    assert error["error"]["details"]["reason"] == "protocol_violation"
    assert not os.path.exists("/tmp/plughost-pwned")
