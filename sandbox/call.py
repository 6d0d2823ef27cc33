"""Run one call on a started child: watch it, then judge it (runs in the host).

    run_call(handle, call, token)
      warm child: handle.hand_over(call)
      _Watcher: selectors.select(min(deadline, exit grace, next memory sample))
          reply bytes  -> ReplyStream (sandbox.replies: sizes checked before bodies)
          status bytes -> handle.feed_status: the child exited and was reaped
          stdout/err   -> capped, a tail kept
          cancel token -> Stop "cancelled"
          sample       -> handle.sample_memory(): over the limit, Stop "memory";
                          OOM-killed at the cgroup, Stop "cgroup_oom"
          deadline     -> Stop "timeout"
      a Stop: handle.kill(), wait for the exit report
      -> Observed --verdict()--> Outcome

The watch talks only to the handle and never closes it (the caller does).
The verdict is a pure function of an `Observed` and the call's limits: no
processes, pipes or clocks, so its tests build `Observed` values by hand.
The deadline is on the monotonic clock and counts from the fork (cold) or
the hand-over (warm), so the plugin's import counts against it.
"""

from __future__ import annotations

import os
import selectors
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from sandbox import trace
from sandbox.cancel import CancelToken
from sandbox.handle import ChildHandle
from sandbox.limits import CallLimits, MiB
from sandbox.outcome import HostFailure, Outcome, Status
from sandbox.protocol import SETUP_FAILED, CallSpec, ProtocolError
from sandbox.replies import ErrorMessage, ReplyStream, parse_reply

WATCHDOG_INTERVAL_S = 0.02
TAIL_BYTES = 2048
# After the final frame, how long the child may take to exit before it is killed.
EXIT_GRACE_S = 0.5
# After a kill, how long to wait for the launcher's report that the child is reaped.
REAP_WAIT_S = 2.0
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

    def add(self, data: bytes) -> None:
        self.total += len(data)
        self.tail += data
        del self.tail[:-TAIL_BYTES]

    def text(self) -> str:
        return self.tail.decode("utf-8", "replace")[-TAIL_BYTES:]


def run_call(handle: ChildHandle, call: CallSpec, token: CancelToken | None) -> Outcome:
    """Run `call` on the started child of `handle` and return its outcome.

    Kills the call's processes when it stops one early; leaves the rest of
    the clean-up (`handle.close`) to the caller.
    """
    started = time.monotonic()
    if handle.warm:
        handle.hand_over(call)
    watch = _Watcher(handle, call.limits, started, token)
    seen = watch.observe()
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
        self.exit_by = float("inf")

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
            cgroup_peak=cgroup_peak,
            streams={name: (s.total, s.text()) for name, s in self.streams.items()},
            elapsed_ms=round((time.monotonic() - self.started) * 1000, 3),
        )

    def _loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            for name in ("status", "reply", "stdout", "stderr"):
                selector.register(self.handle.fds[name], selectors.EVENT_READ, name)
            if self.token is not None:
                selector.register(self.token.fileno(), selectors.EVENT_READ, "cancel")
            next_sample = time.monotonic()
            while self.handle.exit is None:
                now = time.monotonic()
                if now >= self.exit_by:
                    # Replied but lingers (a thread holding it up): end it, keep the reply.
                    self.handle.kill()
                    self.handle.wait_exit(time.monotonic() + REAP_WAIT_S)
                    if self.handle.exit is None:
                        raise _Stopped("unreaped")
                    break
                if now >= self.deadline:
                    raise _Stopped("timeout")
                if now >= next_sample:
                    self._sample_memory()
                    next_sample = now + WATCHDOG_INTERVAL_S
                wait = max(0.0, min(self.deadline, self.exit_by, next_sample) - now)
                for key, _ in selector.select(wait):
                    if not self._on_readable(key.data, key.fd):
                        selector.unregister(key.fd)
                if self.reply.final is not None and self.exit_by == float("inf"):
                    # The reply is in: the child only has to exit.
                    self.exit_by = time.monotonic() + EXIT_GRACE_S
            # The child is gone; pick up what it wrote just before it exited.
            self._drain_after_exit()

    def _on_readable(self, name: str, fd: int) -> bool:
        """Handle bytes on `fd`; False once it is at its end."""
        if name == "cancel":
            raise _Stopped("cancelled")
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not data:
            if name == "status" and self.handle.exit is None:
                raise _Stopped("launcher_gone")
            return False
        if name == "status":
            self.handle.feed_status(data)
        elif name == "reply":
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

    def _drain_after_exit(self) -> None:
        for name in ("reply", "stdout", "stderr"):
            fd = self.handle.fds[name]
            os.set_blocking(fd, False)
            # Grandchildren may still hold the write end; read only what is there.
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
    "launcher_gone", "unreaped" (replied, lingered, and could not be reaped).
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
    cgroup_peak: int | None = None  # the cgroup's own peak, bytes
    streams: dict[str, tuple[int, str]] = field(default_factory=dict)  # total, tail
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
    peak_rss_mb, cgroup_peak_mb where known, and the tails of what the plugin
    printed."""
    outcome = stopped(seen.stop, limits) if seen.stop is not None else judge(seen, limits)
    outcome.details.setdefault("elapsed_ms", seen.elapsed_ms)
    # The cgroup's own maximum counts the page cache too; the samples do not.
    peak_mb = max(seen.peak_rss, seen.maxrss_kb * 1024) / MiB
    outcome.details.setdefault("peak_rss_mb", round(peak_mb, 1))
    if seen.cgroup_peak is not None:  # page cache included, as the kernel counts it
        outcome.details.setdefault("cgroup_peak_mb", round(seen.cgroup_peak / MiB, 1))
    for name, (total, tail) in seen.streams.items():
        if total:
            outcome.details.setdefault(f"{name}_tail", tail)
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
    if stop.kind == "unreaped":
        return _stopped_by_sandbox("crashed", "sandbox child could not be reaped")
    if stop.kind == "launcher_gone":
        # Only the launcher writes the status pipe: it died, and the child with it.
        raise HostFailure(
            "the sandbox launcher exited during the call; it is started again for the next one",
            {"stage": "launcher"},
        )
    raise ValueError(f"unknown stop {stop.kind!r}")


def judge(seen: Observed, limits: CallLimits) -> Outcome:
    """The Outcome of a call whose child exited on its own."""
    assert seen.exit_status is not None
    exit_info = describe_exit(seen.exit_status)
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
