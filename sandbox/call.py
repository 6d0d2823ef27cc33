"""Run one call on a started child: watch it, then judge it (runs in the host).

    run_call(handle, call, token)
      warm child: handle.hand_over(call)
      _Watcher: poll(min(deadline, exit grace, next memory sample))
          reply bytes  -> ReplyStream (sizes checked before bodies)
          status       -> handle.read_status (the pipe's one reader, as is
                          handle.wait_exit's): the child exited, was reaped
          stdout/err   -> capped; a tail kept, and the head for the author
          cancel token -> Stop "cancelled"
          sample       -> handle.sample_memory(): over the limit, Stop "memory";
                          OOM-killed at the cgroup, Stop "cgroup_oom"
          deadline     -> Stop "timeout"
      until the final frame is in (one last memory sample) or the child ended
      a Stop: handle.kill(), wait for the exit report
      handle.finish(): the call ends on its own now (close waits for it, then kills)
      -> Observed --verdict()--> Outcome

The module reads top to bottom as a call goes: how another thread cancels
it (`CancelToken`), how the child's reply frames are read (`ReplyStream`,
the reply models), the watch, and the verdict.

The watch talks only to the handle and never closes it (the caller does).
The verdict is a pure function of an `Observed` and the call's limits: no
processes, pipes or clocks, so its tests build `Observed` values by hand.
The deadline is on the monotonic clock and counts from the fork (cold) or
the hand-over (warm), so the plugin's import counts against it.

The frame format and its limits are `sandbox.protocol`'s; the models that
validate a frame's body live here, apart from it, because they need
pydantic: the launcher and every child import `sandbox.protocol` and never
this module, and a smaller launcher forks (and its children exit) faster.
"""

from __future__ import annotations

import contextvars
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from sandbox import trace
from sandbox.handle import REAP_WAIT_S, ChildHandle, HandleState
from sandbox.jsonbounds import (
    BoundsExceeded,
    NotJson,
    lone_surrogate,
    replace_surrogates,
    scan,
    surely_within,
)
from sandbox.limits import CallLimits, MiB
from sandbox.outcome import CHILD_REASONS, HostFailure, Outcome, Status
from sandbox.protocol import (
    REPLY_BOUNDS,
    SETUP_FAILED,
    CallSpec,
    FrameReader,
    ProtocolError,
    decode_json,
)

# -- cancelling a call from another thread -----------------------------------
#
# `ToolRunner.run(plugin_name, payload)` has a fixed signature, so the token
# travels in a context variable: the thread that runs a call sets it with
# `use_token`, the ToolRunner hands it to `Sandbox.execute`, and the wait
# loop watches the token's descriptor next to the child's pipes.
# `CancelToken.cancel()` makes that descriptor readable, the loop wakes at
# once, and the call's processes are killed.

_current: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar(
    "plughost_cancel_token", default=None
)


class CancelToken:
    """A one-shot cancellation flag with a pollable descriptor."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()
        self._cancelled = False
        self._closed = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def fileno(self) -> int:
        """Descriptor that becomes readable once `cancel()` was called."""
        return self._read

    def cancel(self) -> None:
        """Cancel; idempotent and safe from any thread."""
        with self._lock:
            if self._cancelled or self._closed:
                self._cancelled = True
                return
            self._cancelled = True
            os.write(self._write, b"x")

    def close(self) -> None:
        """Release the descriptors."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read)
                os.close(self._write)


def current_token() -> CancelToken | None:
    """The token of the call running in this context, if any."""
    return _current.get()


@contextmanager
def use_token(token: CancelToken) -> Iterator[CancelToken]:
    """Make `token` the cancel token of calls made inside the block."""
    reset = _current.set(token)
    try:
        yield token
    finally:
        _current.reset(reset)


# -- the child's reply frames, as the host reads them -------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ReadyMessage(_Strict):
    type: Literal["ready"]


class ResultMessage(_Strict):
    type: Literal["result"]
    result: dict[str, Any]


class ErrorMessage(_Strict):
    type: Literal["error"]
    reason: str  # one of CHILD_REASONS, the reasons a child may report itself
    message: str
    exc_type: str
    traceback: str

    @field_validator("reason")
    @classmethod
    def _child_reason(cls, reason: str) -> str:
        if reason not in CHILD_REASONS:
            raise ValueError(f"a child may not report {reason[:40]!r}")
        return reason

    @field_validator("message", "exc_type", "traceback")
    @classmethod
    def _valid_text(cls, text: str) -> str:
        # A plugin's exception message may hold anything; an envelope must encode.
        return replace_surrogates(text)


def _invalid_output(problem: str) -> ErrorMessage:
    return ErrorMessage(
        type="error",
        reason="invalid_output",
        message=f"result {problem}",
        exc_type="InvalidOutput",
        traceback="",
    )


def _decode_bounded(body: bytes) -> Any:
    """Scan a frame from the child for its bounds, then decode it.

    Raises BoundsExceeded (for the caller to judge) or ProtocolError.
    """
    if not surely_within(body, REPLY_BOUNDS):  # else the decoder finds what is not JSON
        try:
            scan(body, REPLY_BOUNDS, members=True)
        except NotJson as exc:
            raise ProtocolError(f"frame is not valid JSON: {exc}") from exc
    return decode_json(body)


def parse_ready(body: bytes) -> None:
    """Check that the first frame is the ready marker."""
    try:
        ReadyMessage.model_validate(_decode_bounded(body))
    except (ValidationError, BoundsExceeded) as exc:
        raise ProtocolError("first frame is not the ready marker") from exc


def parse_reply(body: bytes) -> ResultMessage | ErrorMessage:
    """Parse the final frame. Raises ProtocolError for anything not allowed.

    A result frame whose result breaks the result rules of the module
    docstring comes back as an `invalid_output` ErrorMessage.
    """
    try:
        data = _decode_bounded(body)
    except BoundsExceeded as exc:
        if exc.where == "field 'result'":
            return _invalid_output(exc.problem)
        raise ProtocolError(f"reply {exc}") from exc
    kind = data.get("type") if isinstance(data, dict) else None
    model: type[ResultMessage] | type[ErrorMessage]
    if kind == "result":
        model = ResultMessage
    elif kind == "error":
        model = ErrorMessage
    else:
        raise ProtocolError(f"reply of type {str(kind)[:40]!r} is not allowed")
    try:
        message = model.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(f"malformed {kind} reply: {exc.error_count()} errors") from exc
    if isinstance(message, ResultMessage) and lone_surrogate(message.result):
        return _invalid_output("holds a lone surrogate, which is not valid UTF-8 text")
    return message


class ReplyStream:
    """The child's reply pipe as the protocol allows it: exactly one ready
    frame, then at most one final frame, then nothing."""

    def __init__(self, max_body: int) -> None:
        self._frames = FrameReader(max_body=max_body)
        self.ready = False
        self.final: bytes | None = None
        self.pending = 0  # bytes of an incomplete frame still buffered

    def feed(self, data: bytes) -> None:
        """Add bytes from the reply pipe. Raises ProtocolError for anything
        out of order: bytes after the final frame, a first frame that is not
        the ready marker, a second final frame, an oversized frame."""
        if self.final is not None:
            raise ProtocolError("bytes after the final frame")
        self._frames.feed(data)
        self.pending = self._frames.pending
        while self._frames.frames:
            frame = self._frames.frames.pop(0)
            if not self.ready:
                parse_ready(frame)
                self.ready = True
            elif self.final is None:
                self.final = frame
            else:
                raise ProtocolError("more than one final frame")


# -- the watch -----------------------------------------------------------------

WATCHDOG_INTERVAL_S = 0.02
# A memory sample costs the host time of its own (without a cgroup it walks
# the process table: tens of ms on a slow or emulated machine). The next one
# waits at least this many times as long as the last took, so sampling never
# takes more than a fifth of the watch from reading the child's pipes: the
# verdict of a flood must not turn into a timeout because the host was slow.
SAMPLE_SPACING = 4
# How long a call whose memory no sample saw waits for its exit report.
EXIT_REPORT_WAIT_S = 0.2
TAIL_BYTES = 2048
# What the plugin's author is shown of each stream (`plughost check`, `run
# --debug`, the pytest fixture): its first bytes, never sent to a client.
OUTPUT_BYTES = 64 * 1024
# Room for the frame's own JSON around a result of the maximum size.
FRAME_OVERHEAD = 64 * 1024


class _Stopped(Exception):
    """Ends the watch loop early, carrying the reason."""

    def __init__(self, kind: str, **evidence: object) -> None:
        super().__init__(kind)
        self.stop = Stop(kind, dict(evidence))


@dataclass
class _Stream:
    total: int = 0
    tail: bytearray = field(default_factory=bytearray)
    head: bytearray = field(default_factory=bytearray)

    def add(self, data: bytes) -> None:
        self.total += len(data)
        if len(self.head) < OUTPUT_BYTES:
            self.head += data[: OUTPUT_BYTES - len(self.head)]
        self.tail += data
        del self.tail[:-TAIL_BYTES]

    def output(self) -> str:
        """The stream's first OUTPUT_BYTES as text, with a marker when it was cut."""
        text = self.head.decode("utf-8", "replace")
        cut = self.total - len(self.head)
        if cut:
            text += f"\n[plughost: output cut at {OUTPUT_BYTES} bytes; {cut} more not kept]\n"
        return text

    def text(self) -> str:
        text = self.tail.decode("utf-8", "replace")[-TAIL_BYTES:]
        if self.total > len(self.tail) and "\n" in text:
            text = text.partition("\n")[2]  # from its first whole line: no path cut in two
        return text


def run_call(handle: ChildHandle, call: CallSpec, token: CancelToken | None) -> Outcome:
    """Run `call` on the started child of `handle` and return its outcome.

    Returns as soon as the verdict is final: the final reply frame is in,
    or the child ended without one, or the watch stopped it (and killed the
    call's processes). Leaves the rest (`handle.close`: the call's end, the
    reap, the cgroup, the uid) to the caller.
    """
    started = time.monotonic()
    if handle.state is not HandleState.RUNNING:  # a warm child, stopped: its call now
        handle.hand_over(call)
    watch = _Watcher(handle, call.limits, started, token)
    seen = watch.observe()
    handle.finish()
    trace.mark("host.watch")
    outcome = verdict(seen, call.limits)
    trace.mark("host.verdict")
    return outcome


class _Watcher:
    """The wait loop of one call, over its handle."""

    def __init__(
        self,
        handle: ChildHandle,
        limits: CallLimits,
        started: float,
        token: CancelToken | None,
    ) -> None:
        self.handle = handle
        self.limits = limits
        self.token = token
        self.started = started
        self.deadline = started + limits.timeout_s
        self.reply = ReplyStream(max_body=limits.max_output_bytes + FRAME_OVERHEAD)
        self.streams = {name: _Stream() for name in ("stdout", "stderr")}
        self.peak_rss = 0

    def observe(self) -> Observed:
        """Watch until the child exits or is stopped; return what was seen."""
        stop = None
        try:
            self._loop()
        except _Stopped as stopped:
            stop = stopped.stop
            self.handle.kill()
            self.handle.wait_exit(time.monotonic() + REAP_WAIT_S)
        handle = self.handle
        if stop is None and self.peak_rss == 0 and handle.exit is None:
            # A call that replied before any sample saw its memory (it was
            # gone by the last one): its exit report carries its maximum RSS,
            # and its process ends right after its reply.
            handle.wait_exit(time.monotonic() + EXIT_REPORT_WAIT_S)
        exit_ = handle.exit
        oom_killed, cgroup_peak = handle.memory_at_end()
        return Observed(
            exit_status=exit_.status if exit_ is not None else None,
            maxrss_kb=exit_.maxrss_kb if exit_ is not None else 0,
            ready=self.reply.ready,
            final=self.reply.final,
            pending=self.reply.pending,
            stop=stop,
            oom_killed=stop is None and oom_killed,
            peak_rss=self.peak_rss,
            memory_counted=handle.memory_counted,
            cgroup_peak=cgroup_peak,
            streams={name: (s.total, s.text()) for name, s in self.streams.items()},
            output={name: s.output() for name, s in self.streams.items() if s.total},
            elapsed_ms=round((time.monotonic() - self.started) * 1000, 3),
        )

    def _loop(self) -> None:
        # poll, not an epoll selector: no descriptor of its own to make and
        # close per call, and any descriptor number (select stops at 1024).
        poller = select.poll()
        names = {self.handle.fds[name]: name for name in ("status", "reply", "stdout", "stderr")}
        if self.token is not None:
            names[self.token.fileno()] = "cancel"
        for fd in names:
            poller.register(fd, select.POLLIN)
        # The first sample one interval in: a child just forked holds
        # nothing of its own yet (the cgroup's limit holds from its start).
        next_sample = time.monotonic() + WATCHDOG_INTERVAL_S
        # Until the final frame is in, or the child ended without one.
        while self.handle.exit is None and self.reply.final is None:
            now = time.monotonic()
            if now >= self.deadline:
                raise _Stopped("timeout")
            if now >= next_sample:
                self._sample_memory()
                took = time.monotonic() - now
                next_sample = now + max(WATCHDOG_INTERVAL_S, SAMPLE_SPACING * took)
            wait = max(0.0, min(self.deadline, next_sample) - time.monotonic())
            for fd, _ in poller.poll(wait * 1000):
                if not self._on_readable(names[fd], fd):
                    poller.unregister(fd)
        if self.reply.final is not None:
            # The verdict is final now; the call's memory as it answered
            # may be its peak (a fast call is sampled only here).
            self._sample_memory()
        # Pick up what it wrote before its reply (or its exit).
        self._drain()

    def _on_readable(self, name: str, fd: int) -> bool:
        """Handle bytes on `fd`; False once it is at its end."""
        if name == "cancel":
            raise _Stopped("cancelled")
        if name == "status":  # the launcher's exit report, or the pipe's end
            if self.handle.read_status():
                return True
            if self.handle.exit is None:
                raise _Stopped("launcher_gone")
            return False
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not data:
            return False
        if name == "reply":
            self._on_reply(data)
        else:
            self.streams[name].add(data)
            if sum(s.total for s in self.streams.values()) > self.limits.max_stream_bytes:
                raise _Stopped("stream", stream=name)
        return True

    def _on_reply(self, data: bytes) -> None:
        try:
            self.reply.feed(data)
        except ProtocolError as exc:
            raise _Stopped("protocol", problem=str(exc)) from exc

    def _sample_memory(self) -> None:
        # The cgroup counts each page once (RSS sums count pages shared after
        # fork in every process) and includes the tmpfs the call wrote.
        rss, oom_killed = self.handle.sample_memory()
        if oom_killed:
            raise _Stopped("cgroup_oom")
        self.peak_rss = max(self.peak_rss, rss)
        if rss > self.limits.memory_mb * MiB:
            raise _Stopped("memory", rss=rss)

    def _drain(self) -> None:
        for name in ("reply", "stdout", "stderr"):
            fd = self.handle.fds[name]
            os.set_blocking(fd, False)
            # The call's processes may still hold the write end; read what is there.
            for _ in range(64):
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if not data:
                    break
                if name == "reply":
                    self._on_reply(data)
                else:
                    self.streams[name].add(data)


# -- the verdict: pure ---------------------------------------------------------


@dataclass(frozen=True)
class Stop:
    """Why the watch ended a call before the child exited on its own.

    kind: "timeout", "cancelled", "memory" (a sample over the limit; evidence
    `rss`), "cgroup_oom" (the kernel killed at the memory cgroup), "stream"
    (too much printed; evidence `stream`), "protocol" (evidence `problem`),
    "launcher_gone".
    """

    kind: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class Observed:
    """Everything the watch saw of one call."""

    exit_status: int | None = None  # raw wait status; None if never reported
    maxrss_kb: int = 0
    ready: bool = False
    final: bytes | None = None  # the final reply frame's body
    pending: int = 0  # bytes of an unfinished frame on the reply pipe
    stop: Stop | None = None
    oom_killed: bool = False  # read after the child exited
    peak_rss: int = 0  # highest sampled memory, bytes
    memory_counted: bool = False  # the samples are a memory cgroup's count
    cgroup_peak: int | None = None  # the cgroup's own peak, bytes
    streams: dict[str, tuple[int, str]] = field(default_factory=dict)  # total, tail
    output: dict[str, str] = field(default_factory=dict)  # the head of each, for the author
    elapsed_ms: float = 0.0


def describe_exit(status: int) -> dict[str, Any]:
    """Turn a raw wait status into `{"exit_code": n}` or `{"signal": "SIGSEGV"}`."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"SIG{number}"
        return {"signal": name}
    return {"exit_code": os.WEXITSTATUS(status)}


def verdict(seen: Observed, limits: CallLimits) -> Outcome:
    """The call's Outcome, with its evidence in `details`: elapsed_ms,
    peak_rss_mb and cgroup_peak_mb where measured, and the tail of what the
    plugin wrote to stderr (where a crash's stack is). What it printed, both
    streams, is in `output`, for its author alone: never in `details`, which
    a client is shown."""
    outcome = stopped(seen.stop, limits) if seen.stop is not None else judge(seen, limits)
    outcome.details.setdefault("elapsed_ms", seen.elapsed_ms)
    # The cgroup's own maximum counts the page cache too; the samples do not.
    # The exit report's maximum RSS counts the pages of the interpreter and
    # its libraries as well, which the host loaded and no call is charged for:
    # where a memory cgroup's samples measured the call, they are its peak.
    # Nothing measured (a call over before its first sample, its exit not
    # reported yet) is no figure, not a peak of 0.
    if seen.memory_counted and seen.peak_rss:
        peak = seen.peak_rss
    else:
        peak = max(seen.peak_rss, seen.maxrss_kb * 1024)
    if peak:
        outcome.details.setdefault("peak_rss_mb", round(peak / MiB, 1))
    if seen.cgroup_peak is not None:  # page cache included, as the kernel counts it
        outcome.details.setdefault("cgroup_peak_mb", round(seen.cgroup_peak / MiB, 1))
    total, tail = seen.streams.get("stderr", (0, ""))
    if total:
        outcome.details.setdefault("stderr_tail", tail)
    outcome.output = dict(seen.output)
    return outcome


def _stopped_by_sandbox(reason: str, message: str, **details: Any) -> Outcome:
    return Outcome(Status.SANDBOX_STOPPED, reason=reason, message=message, details=details)


def stopped(stop: Stop, limits: CallLimits) -> Outcome:
    """The Outcome of a call the watch stopped early."""
    evidence = stop.evidence
    if stop.kind == "timeout":
        message = f"plugin did not finish within {limits.timeout_s:g} s"
        return _stopped_by_sandbox("timeout", message, limit_s=limits.timeout_s)
    if stop.kind == "cancelled":
        return _stopped_by_sandbox("cancelled", "call was cancelled")
    if stop.kind == "memory":
        rss = evidence["rss"]
        return _stopped_by_sandbox(
            "memory_limit",
            f"plugin used {rss / MiB:.0f} MB, the limit is {limits.memory_mb} MB",
            limit_mb=limits.memory_mb,
            peak_rss_mb=round(rss / MiB, 1),
        )
    if stop.kind == "cgroup_oom":
        return _stopped_by_sandbox(
            "memory_limit",
            "the kernel killed a process of the plugin at its memory cgroup limit",
            limit_mb=limits.memory_mb,
            enforced_by="cgroup",
        )
    if stop.kind == "stream":
        return _stopped_by_sandbox(
            "output_too_large",
            f"plugin printed more than {limits.max_stream_bytes} bytes",
            stream=evidence["stream"],
            limit_bytes=limits.max_stream_bytes,
        )
    if stop.kind == "protocol":
        return _stopped_by_sandbox("protocol_violation", evidence["problem"])
    if stop.kind == "launcher_gone":
        # Only the launcher writes the status pipe: it died, and the child with it.
        raise HostFailure(
            "the sandbox launcher exited during the call; it is started again for the next one",
            {"stage": "launcher"},
        )
    raise ValueError(f"unknown stop {stop.kind!r}")


def judge(seen: Observed, limits: CallLimits) -> Outcome:
    """The Outcome of a call that ended on its own: it replied, or its
    child exited without a reply (its wait status is then known)."""
    exit_info = describe_exit(seen.exit_status) if seen.exit_status is not None else {}
    if not seen.ready:
        if exit_info.get("exit_code") == SETUP_FAILED:
            raise HostFailure(
                "the sandbox could not apply its limits; the plugin was not run",
                {"stage": "sandbox_setup", "stderr_tail": seen.streams["stderr"][1]},
            )
        if seen.oom_killed:
            return crashed(seen, exit_info, limits)
        message = "sandbox child died before it was ready"
        return _stopped_by_sandbox("crashed", message, **exit_info)
    if seen.pending:
        message = "truncated frame on the reply pipe"
        return _stopped_by_sandbox("protocol_violation", message, **exit_info)
    if seen.final is None:
        return crashed(seen, exit_info, limits)
    try:
        reply = parse_reply(seen.final)
    except ProtocolError as exc:
        return _stopped_by_sandbox("protocol_violation", str(exc))
    if isinstance(reply, ErrorMessage):
        memory = reply.reason == "memory_limit"
        return Outcome(
            Status.SANDBOX_STOPPED if memory else Status.PLUGIN_FAILED,
            reason=reply.reason,
            message=reply.message.splitlines()[0][:500] if reply.message else reply.exc_type,
            details={"exception": reply.exc_type[:200]}
            | ({"limit_mb": limits.memory_mb} if memory else {}),
            traceback=reply.traceback,
        )
    if len(seen.final) > limits.max_output_bytes:
        return Outcome(
            Status.PLUGIN_FAILED,
            reason="output_too_large",
            message=f"result of {len(seen.final)} bytes, the limit is {limits.max_output_bytes}",
            details={"limit_bytes": limits.max_output_bytes},
        )
    return Outcome(Status.SUCCESS, result=reply.result)


def crashed(seen: Observed, exit_info: dict[str, Any], limits: CallLimits) -> Outcome:
    """The Outcome of a child that died without a reply."""
    signal_name = exit_info.get("signal")
    # Whichever process of the call the kernel picked (the plugin, its init,
    # its relay), a kill at the memory cgroup means the memory limit.
    if seen.oom_killed:
        return _stopped_by_sandbox(
            "memory_limit",
            f"plugin exceeded its {limits.memory_mb} MB memory cgroup",
            limit_mb=limits.memory_mb,
            enforced_by="cgroup",
            **exit_info,
        )
    if signal_name == signal.SIGXCPU.name:
        message = "plugin used up its CPU time"
        return _stopped_by_sandbox("timeout", message, limit_s=limits.timeout_s, **exit_info)
    if signal_name == signal.SIGXFSZ.name:
        detail = "plugin exceeded the file size limit"
    elif signal_name:
        detail = f"plugin process was killed by {signal_name}"
    else:
        detail = f"plugin process exited with code {exit_info['exit_code']} without a reply"
    return _stopped_by_sandbox("crashed", detail, **exit_info)
