"""The watch loop of one call, driven through a handle with real pipes and no
process behind it: it reads only what the handle gives it, and stops the
call (through the handle) for the deadline, memory and output limits."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from sandbox.call import OUTPUT_BYTES, run_call
from sandbox.handle import MOVES, PIPES, ChildHandle, HandleState, HandleStateError
from sandbox.launcher_client import Launcher
from sandbox.limits import HostLimits, MiB, PluginLimits
from sandbox.outcome import HostFailure, Status
from sandbox.protocol import EXIT, READY, CallSpec, encode_frame

LIMITS = HostLimits(max_stream_bytes=1024).clamp(PluginLimits(timeout_s=0.3, memory_mb=32))
CALL = CallSpec("fake", "/nonexistent", "m:C", LIMITS, b"img", "image/png", {})


class PipeHandle(ChildHandle):
    """A handle whose child is the test: it writes the child's pipes itself."""

    def __init__(self) -> None:
        super().__init__(Launcher(), None, -1, None, None, pid_namespace=False)
        self._to(HandleState.RUNNING)  # as `start` leaves a cold child
        self.ends = {name: os.pipe2(os.O_CLOEXEC) for name in PIPES}
        self.fds = {name: pair[0] for name, pair in self.ends.items()}
        self.memory_now = 0
        self.kills = 0

    def write(self, name: str, data: bytes) -> None:
        os.write(self.ends[name][1], data)

    def exits(self, status: int) -> None:
        self.write("status", EXIT.pack(status, 1024))

    def sample_memory(self) -> tuple[int, bool]:
        return self.memory_now, False

    def memory_at_end(self) -> tuple[bool, int | None]:
        return False, None

    def kill(self) -> None:
        self.kills += 1
        if self.exit is None:
            self.exits(int(signal.SIGKILL))  # the launcher reaps what was killed

    def close_pipes(self) -> None:
        for read_end, write_end in self.ends.values():
            os.close(read_end)
            os.close(write_end)


@pytest.fixture
def handle() -> Iterator[PipeHandle]:
    made = PipeHandle()
    yield made
    made.close_pipes()


def test_a_reply_and_an_exit_are_a_success(handle: PipeHandle) -> None:
    handle.write(
        "reply", encode_frame(READY) + encode_frame({"type": "result", "result": {"a": 1}})
    )
    handle.write("stdout", b"hello")
    handle.exits(0)
    outcome = run_call(handle, CALL, token=None)
    assert outcome.status is Status.SUCCESS and outcome.result == {"a": 1}
    assert outcome.output == {"stdout": "hello"} and outcome.details["peak_rss_mb"] == 1.0
    assert "hello" not in str(outcome.details)  # a client is shown the details
    assert handle.kills == 0


def test_the_authors_output_is_the_head_of_each_stream_cut_with_a_marker() -> None:
    limits = HostLimits(max_stream_bytes=MiB).clamp(PluginLimits(timeout_s=5, memory_mb=32))
    handle = PipeHandle()
    try:

        def child() -> None:
            handle.write("stdout", b"first line\n" + b"x" * (OUTPUT_BYTES + 1000))
            handle.write("stderr", b"warning\n")
            handle.write(
                "reply", encode_frame(READY) + encode_frame({"type": "result", "result": {}})
            )
            handle.exits(0)

        writer = threading.Thread(target=child)
        writer.start()
        outcome = run_call(handle, replace(CALL, limits=limits), token=None)
        writer.join(5)
    finally:
        handle.close_pipes()
    stdout = outcome.output["stdout"]
    assert stdout.startswith("first line\nxxx")
    assert stdout.endswith(f"[plughost: output cut at {OUTPUT_BYTES} bytes; 1011 more not kept]\n")
    assert outcome.output["stderr"] == "warning\n"
    assert "first line" not in str(outcome.details) and "stdout_tail" not in outcome.details
    assert outcome.details["stderr_tail"] == "warning\n"  # the client's short tail (SPEC 4)


def test_a_call_no_sample_saw_takes_its_peak_from_its_exit_report(handle: PipeHandle) -> None:
    # It answered and was gone before any sample: its memory is its exit
    # report's maximum RSS, which comes a moment after the reply.
    handle.write(
        "reply", encode_frame(READY) + encode_frame({"type": "result", "result": {"a": 1}})
    )
    late = threading.Timer(0.05, handle.exits, args=(0,))
    late.start()
    outcome = run_call(handle, CALL, token=None)
    late.join()
    assert outcome.status is Status.SUCCESS
    assert outcome.details["peak_rss_mb"] == 1.0


def test_a_peak_nothing_measured_is_left_out_not_shown_as_zero(handle: PipeHandle) -> None:
    handle.write(
        "reply", encode_frame(READY) + encode_frame({"type": "result", "result": {"a": 1}})
    )
    outcome = run_call(handle, CALL, token=None)  # no sample, no exit report
    assert outcome.status is Status.SUCCESS
    assert "peak_rss_mb" not in outcome.details


def test_a_silent_child_is_stopped_at_its_deadline_through_the_handle(handle: PipeHandle) -> None:
    outcome = run_call(handle, CALL, token=None)
    assert outcome.reason == "timeout" and handle.kills == 1
    assert outcome.details["elapsed_ms"] >= 300


def test_memory_over_the_limit_stops_the_call(handle: PipeHandle) -> None:
    handle.memory_now = 40 * MiB
    outcome = run_call(handle, CALL, token=None)
    assert outcome.reason == "memory_limit" and outcome.details["peak_rss_mb"] == 40.0
    assert handle.kills == 1


def test_printing_past_the_stream_limit_stops_the_call(handle: PipeHandle) -> None:
    handle.write("stderr", b"x" * 2000)
    outcome = run_call(handle, CALL, token=None)
    assert outcome.reason == "output_too_large" and outcome.details["stream"] == "stderr"
    assert handle.kills == 1


def test_a_forged_first_frame_is_a_protocol_violation(handle: PipeHandle) -> None:
    handle.write("reply", encode_frame({"type": "result", "result": {}}))
    outcome = run_call(handle, CALL, token=None)
    assert outcome.reason == "protocol_violation" and handle.kills == 1


def test_a_status_pipe_closed_without_an_exit_means_the_launcher_is_gone(
    handle: PipeHandle,
) -> None:
    os.close(handle.ends["status"][1])
    handle.ends["status"] = (handle.ends["status"][0], os.open(os.devnull, os.O_WRONLY))
    with pytest.raises(HostFailure, match="launcher exited") as raised:
        run_call(handle, CALL, token=None)
    assert raised.value.details["stage"] == "launcher"
    assert handle.state is HandleState.GONE and handle.exit is None


def test_the_status_pipe_has_one_reader_for_the_watch_and_wait_exit(handle: PipeHandle) -> None:
    # The launcher's exit report comes in two writes: whatever part the watch
    # read with the reply, wait_exit reads the rest into the same record.
    record = EXIT.pack(0, 2048)
    handle.write(
        "reply", encode_frame(READY) + encode_frame({"type": "result", "result": {"a": 1}})
    )
    handle.write("status", record[:5])
    late = threading.Timer(0.05, handle.write, args=("status", record[5:]))
    late.start()
    outcome = run_call(handle, CALL, token=None)
    late.join()
    assert outcome.status is Status.SUCCESS and outcome.details["peak_rss_mb"] == 2.0
    assert handle.state is HandleState.EXITED and not handle.reaped
    os.close(handle.ends["status"][1])  # the launcher reaped the child: the pipe ends
    handle.ends["status"] = (handle.ends["status"][0], os.open(os.devnull, os.O_WRONLY))
    handle.wait_exit(time.monotonic() + 2, reaped=True)
    assert handle.state is HandleState.REAPED and handle.reaped


def test_the_handle_refuses_a_move_its_states_do_not_allow(handle: PipeHandle) -> None:
    with pytest.raises(HandleStateError, match="a RUNNING child's handle is handed no call"):
        handle.hand_over(CALL)  # a cold child runs its call already
    handle.exits(0)
    handle.wait_exit(time.monotonic() + 2)
    assert handle.state is HandleState.EXITED
    with pytest.raises(HandleStateError, match="cannot go from EXITED to STOPPED"):
        handle._to(HandleState.STOPPED)  # an exited child is never stopped for a call
    assert handle.state is HandleState.EXITED
    assert set(MOVES) == set(HandleState) and MOVES[HandleState.CLOSED] == frozenset()


class SlowSamplingHandle(PipeHandle):
    """A host that takes `sample_s` to measure the call's memory, as one
    without a cgroup does on a slow or emulated machine (it walks the process
    table)."""

    def __init__(self, sample_s: float) -> None:
        super().__init__()
        self.sample_s = sample_s
        self.samples = 0

    def sample_memory(self) -> tuple[int, bool]:
        self.samples += 1
        time.sleep(self.sample_s)
        return self.memory_now, False


def test_a_flood_is_output_too_large_however_slowly_the_host_samples_memory() -> None:
    limits = HostLimits(max_stream_bytes=2 * MiB).clamp(PluginLimits(timeout_s=1, memory_mb=32))
    slow = SlowSamplingHandle(sample_s=0.05)
    flooding = threading.Event()

    def flood() -> None:  # 6.4 MB/s: a child on an emulated machine
        with contextlib.suppress(OSError):
            while not flooding.is_set():
                slow.write("stdout", b"y" * 65536)
                time.sleep(0.01)

    writer = threading.Thread(target=flood)
    writer.start()
    try:
        outcome = run_call(slow, replace(CALL, limits=limits), token=None)
    finally:
        flooding.set()
        os.set_blocking(slow.fds["stdout"], False)
        while writer.is_alive():  # let a blocked write finish
            with contextlib.suppress(BlockingIOError):
                os.read(slow.fds["stdout"], 1 << 20)
            writer.join(0.01)
        slow.close_pipes()
    assert outcome.reason == "output_too_large", outcome
    assert outcome.details["elapsed_ms"] < 1000
    # Sampling slowed down with its cost instead of starving the reads.
    assert slow.samples * slow.sample_s < outcome.details["elapsed_ms"] / 1000 / 2
