"""The verdict is a pure function of what the watch saw: each outcome of the
outcome table, decided from hand-built observations, without a process."""

from __future__ import annotations

import os
import signal

import pytest

from sandbox.call import Observed, Stop, describe_exit, verdict
from sandbox.limits import HostLimits, MiB, PluginLimits
from sandbox.outcome import HostFailure, Status
from sandbox.protocol import SETUP_FAILED, encode_frame

LIMITS = HostLimits().clamp(PluginLimits(timeout_s=2, memory_mb=64))
EXIT_0 = 0  # raw wait status of a normal exit with code 0


def _signalled(sig: signal.Signals) -> int:
    return int(sig)  # raw wait status of a process killed by `sig` (no core)


def _exited(code: int) -> int:
    return code << 8


def _body(message: dict[str, object]) -> bytes:
    return encode_frame(message)[4:]


def _error_frame(reason: str, message: str, exc_type: str, traceback: str = "") -> bytes:
    return _body(
        {
            "type": "error",
            "reason": reason,
            "message": message,
            "exc_type": exc_type,
            "traceback": traceback,
        }
    )


def _seen(**fields: object) -> Observed:
    streams = {"stdout": (0, ""), "stderr": (0, "")}
    return Observed(streams=streams, **fields)  # type: ignore[arg-type]


def test_wait_statuses_are_described_by_exit_code_or_signal_name() -> None:
    assert describe_exit(_exited(3)) == {"exit_code": 3}
    assert describe_exit(_signalled(signal.SIGSEGV)) == {"signal": "SIGSEGV"}
    assert os.WIFSIGNALED(_signalled(signal.SIGKILL))


def test_a_result_frame_is_a_success_with_the_result() -> None:
    final = _body({"type": "result", "result": {"width": 3}})
    outcome = verdict(_seen(exit_status=EXIT_0, ready=True, final=final), LIMITS)
    assert outcome.status is Status.SUCCESS and outcome.result == {"width": 3}
    assert "peak_rss_mb" not in outcome.details and "elapsed_ms" in outcome.details  # not measured


def test_an_error_frame_is_the_plugins_failure_with_its_message() -> None:
    final = _error_frame("plugin_raised", "kaboom\nsecond line", "RuntimeError", "tb")
    outcome = verdict(_seen(exit_status=EXIT_0, ready=True, final=final), LIMITS)
    assert outcome.status is Status.PLUGIN_FAILED and outcome.reason == "plugin_raised"
    assert outcome.message == "kaboom" and outcome.traceback == "tb"
    assert outcome.details["exception"] == "RuntimeError"


def test_a_child_memory_error_reply_is_the_memory_limit() -> None:
    final = _error_frame("memory_limit", "out of memory", "MemoryError")
    outcome = verdict(_seen(exit_status=EXIT_0, ready=True, final=final), LIMITS)
    assert outcome.status is Status.SANDBOX_STOPPED and outcome.reason == "memory_limit"
    assert outcome.details["limit_mb"] == 64


def test_a_result_over_the_output_limit_is_output_too_large() -> None:
    big = "x" * LIMITS.max_output_bytes
    final = _body({"type": "result", "result": {"blob": big}})
    outcome = verdict(_seen(exit_status=EXIT_0, ready=True, final=final), LIMITS)
    assert outcome.reason == "output_too_large"
    assert outcome.details["limit_bytes"] == LIMITS.max_output_bytes


@pytest.mark.parametrize(
    ("status", "reason", "words"),
    [
        (_signalled(signal.SIGSEGV), "crashed", "killed by SIGSEGV"),
        (_signalled(signal.SIGXCPU), "timeout", "CPU time"),
        (_signalled(signal.SIGXFSZ), "crashed", "file size limit"),
        (_exited(7), "crashed", "exited with code 7 without a reply"),
    ],
)
def test_a_child_that_died_after_ready_without_a_reply_is_judged_by_its_status(
    status: int, reason: str, words: str
) -> None:
    outcome = verdict(_seen(exit_status=status, ready=True), LIMITS)
    assert outcome.status is Status.SANDBOX_STOPPED and outcome.reason == reason
    assert words in outcome.message


def test_a_kill_at_the_memory_cgroup_is_the_memory_limit_whatever_the_signal() -> None:
    seen = _seen(exit_status=_signalled(signal.SIGKILL), ready=True, oom_killed=True)
    outcome = verdict(seen, LIMITS)
    assert outcome.reason == "memory_limit" and outcome.details["enforced_by"] == "cgroup"
    assert outcome.details["signal"] == "SIGKILL"


def test_a_failed_setup_is_a_host_failure_with_the_childs_stderr() -> None:
    seen = _seen(exit_status=_exited(SETUP_FAILED))
    seen.streams["stderr"] = (12, "setup failed")
    with pytest.raises(HostFailure, match="could not apply its limits") as raised:
        verdict(seen, LIMITS)
    assert raised.value.details["stage"] == "sandbox_setup"
    assert raised.value.details["stderr_tail"] == "setup failed"


def test_a_child_dead_before_ready_is_crashed() -> None:
    outcome = verdict(_seen(exit_status=_signalled(signal.SIGABRT)), LIMITS)
    assert outcome.reason == "crashed" and "before it was ready" in outcome.message


def test_a_truncated_or_forged_final_frame_is_a_protocol_violation() -> None:
    truncated = verdict(_seen(exit_status=EXIT_0, ready=True, pending=3), LIMITS)
    assert truncated.reason == "protocol_violation" and "truncated" in truncated.message
    forged = verdict(_seen(exit_status=EXIT_0, ready=True, final=b'{"type":"x"}'), LIMITS)
    assert forged.reason == "protocol_violation"


@pytest.mark.parametrize(
    ("stop", "reason", "status"),
    [
        (Stop("timeout"), "timeout", Status.SANDBOX_STOPPED),
        (Stop("cancelled"), "cancelled", Status.SANDBOX_STOPPED),
        (Stop("memory", {"rss": 100 * MiB}), "memory_limit", Status.SANDBOX_STOPPED),
        (Stop("cgroup_oom"), "memory_limit", Status.SANDBOX_STOPPED),
        (Stop("stream", {"stream": "stdout"}), "output_too_large", Status.SANDBOX_STOPPED),
        (Stop("protocol", {"problem": "bad"}), "protocol_violation", Status.SANDBOX_STOPPED),
    ],
)
def test_a_stop_decides_the_outcome_before_the_exit_status(
    stop: Stop, reason: str, status: Status
) -> None:
    final = _body({"type": "result", "result": {}})
    outcome = verdict(_seen(exit_status=EXIT_0, ready=True, final=final, stop=stop), LIMITS)
    assert outcome.reason == reason and outcome.status is status


def test_a_launcher_gone_mid_call_is_a_host_failure() -> None:
    final = _body({"type": "result", "result": {}})
    seen = _seen(exit_status=EXIT_0, ready=True, final=final, stop=Stop("launcher_gone"))
    with pytest.raises(HostFailure, match="launcher exited during the call") as raised:
        verdict(seen, LIMITS)
    assert raised.value.details["stage"] == "launcher"


def test_the_evidence_of_memory_and_output_is_attached() -> None:
    seen = _seen(
        stop=Stop("memory", {"rss": 100 * MiB}),
        peak_rss=80 * MiB,
        maxrss_kb=90 * 1024,
        cgroup_peak=120 * MiB,
        elapsed_ms=12.5,
    )
    seen.streams["stderr"] = (5, "hello")
    seen.output["stdout"] = "printed"
    outcome = verdict(seen, LIMITS)
    assert outcome.details["peak_rss_mb"] == 100.0  # the sample that broke the limit
    assert outcome.details["cgroup_peak_mb"] == 120.0
    assert outcome.details["stderr_tail"] == "hello" and "stdout_tail" not in outcome.details
    assert outcome.output == {"stdout": "printed"} and "printed" not in str(outcome.details)
    assert outcome.details["elapsed_ms"] == 12.5 and outcome.details["limit_mb"] == 64


def test_a_call_nothing_measured_has_no_peak_rather_than_a_peak_of_zero() -> None:
    outcome = verdict(_seen(final=_body({"type": "result", "result": {}}), ready=True), LIMITS)
    assert outcome.status is Status.SUCCESS
    assert "peak_rss_mb" not in outcome.details
    measured = verdict(
        _seen(final=_body({"type": "result", "result": {}}), ready=True, maxrss_kb=2048), LIMITS
    )
    assert measured.details["peak_rss_mb"] == 2.0


def test_an_unknown_stop_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown stop"):
        verdict(_seen(stop=Stop("nonsense")), LIMITS)


def test_where_a_memory_cgroup_counts_the_call_its_count_is_the_peak() -> None:
    # The exit report's maximum RSS counts shared library pages no call is
    # charged for; it is the peak only where nothing else measured the call.
    final = _body({"type": "result", "result": {}})
    counted = _seen(
        final=final, ready=True, peak_rss=120 * MiB, maxrss_kb=145 * 1024, memory_counted=True
    )
    assert verdict(counted, LIMITS).details["peak_rss_mb"] == 120.0
    unsampled = _seen(final=final, ready=True, maxrss_kb=9 * 1024, memory_counted=True)
    assert verdict(unsampled, LIMITS).details["peak_rss_mb"] == 9.0
    summed = _seen(final=final, ready=True, peak_rss=120 * MiB, maxrss_kb=145 * 1024)
    assert verdict(summed, LIMITS).details["peak_rss_mb"] == 145.0
