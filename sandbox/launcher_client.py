"""The host's end of the launcher (runs in the host): `Launcher` starts the
launcher process (`sandbox.launcher`) and sends it requests over its
SEQPACKET socket, with descriptors (SCM_RIGHTS):

    Launcher.start_child(spec, fds)  -> StartChild: fork a call's child
            .kill_call(token)        -> KillCall: SIGKILL the child of that spec
            .kill_uid(uid)           -> KillUid: kill(-1) as that uid, confirmed
            .stop_uid(uid)           -> StopUid: stop every process of that uid

The host imports this module, never `sandbox.launcher` (and with it the
child's code and every layer): it starts the launcher by the path of its
source, SOURCE_ROOT.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from sandbox import trace
from sandbox.outcome import HostFailure
from sandbox.protocol import (
    CHILD_FDS,
    EXIT,
    SAFE_ENV,
    ChildSpec,
    KillCall,
    KillUid,
    StartChild,
    StopUid,
    encode_request,
)

# The directory `sandbox` is in: the launcher's interpreter imports it from there.
SOURCE_ROOT = str(Path(__file__).resolve().parent.parent)


class LauncherError(HostFailure):
    """The launcher could not start a child (it died or refused)."""


class Launcher:
    """Host-side handle on the launcher process; safe to share between threads.

    The launcher is started on first use and started again if it has died.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        """Pid of the running launcher, or None before the first call."""
        process = self._process
        return None if process is None else int(process.pid)

    def _alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _ensure_started(self) -> socket.socket:
        if self._sock is not None and self._alive():
            return self._sock
        self._stop_locked()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.set_inheritable(False)
        bootstrap = (
            f"import sys; sys.path.insert(0, {SOURCE_ROOT!r}); "
            "import sandbox.launcher as launcher; launcher.main()"
        )
        traced = [trace.path()] if trace.path() else []  # a measurement (scripts/phases.py)
        process = subprocess.Popen(
            [sys.executable, "-E", "-s", "-c", bootstrap, str(theirs.fileno()), *traced],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=SAFE_ENV,
        )
        theirs.close()
        self._process, self._sock = process, ours
        return ours

    def start(self) -> None:
        """Start the launcher now rather than at the first call (a host about
        to give up root starts it while it still can)."""
        with self._lock:
            self._ensure_started()

    def start_child(self, spec: ChildSpec, fds: dict[str, int]) -> None:
        """Ask the launcher to fork a child for `spec` with the descriptors `fds`.

        `fds` maps every name of CHILD_FDS to a descriptor; the caller keeps
        its own copies and closes them. Raises LauncherError if the launcher
        cannot be reached even after a restart.
        """
        message = encode_request(StartChild(spec))
        trace.mark("host.spec_encode")
        ordered = [fds[name] for name in CHILD_FDS]
        with self._lock:
            for attempt in (1, 2):
                sock = self._ensure_started()
                try:
                    socket.send_fds(sock, [message], ordered)
                    trace.mark("host.send")
                    return
                except OSError as exc:
                    self._stop_locked()
                    if attempt == 2:
                        raise LauncherError(f"launcher unreachable: {exc}") from exc

    def kill_call(self, token: str) -> None:
        """Ask the launcher to SIGKILL the child it started for the spec with
        this `token`, unless it has reaped it already (the launcher knows; a
        pid the host remembers may name another process by then). Does
        nothing when the launcher is gone (its children went with it)."""
        with self._lock:
            if self._sock is None or not self._alive():
                return
            with contextlib.suppress(OSError):
                self._sock.send(encode_request(KillCall(token)))

    def kill_uid(self, uid: int, timeout_s: float = 2.0) -> bool:
        """Kill every process running as `uid` in one atomic `kill(-1)`.

        Returns True when the launcher confirmed it, False on timeout or if
        the launcher is gone (callers then fall back to a sweep).
        """
        done_r, done_w = os.pipe2(os.O_CLOEXEC)
        try:
            with self._lock:
                if self._sock is None or not self._alive():
                    return False
                try:
                    socket.send_fds(self._sock, [encode_request(KillUid(uid))], [done_w])
                except OSError:
                    return False
            os.close(done_w)
            done_w = -1
            if not wait_readable(done_r, time.monotonic() + timeout_s):
                return False
            data = os.read(done_r, EXIT.size)
            return len(data) == EXIT.size and os.waitstatus_to_exitcode(EXIT.unpack(data)[0]) == 0
        finally:
            os.close(done_r)
            if done_w >= 0:
                os.close(done_w)

    def stop_uid(self, uid: int) -> tuple[int, int] | None:
        """Have every process of `uid` stopped until the host continues them.

        The launcher forks a stopper of `uid` (`sandbox.launcher._fork_stopper`)
        that stops them all at once and waits until each of their threads
        is stopped. Returns two descriptors at once, `(answer, go)`: `answer`
        becomes readable with b"1" once they are all stopped (b"0", or its
        end, when they were not within the stopper's deadline); one byte
        written on `go` continues them all (SIGCONT, at once); closing `go`
        without a write leaves them stopped for the kill. None when the
        launcher is gone.
        """
        done_r, done_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        sent = False
        try:
            with self._lock:
                if self._sock is not None and self._alive():
                    with contextlib.suppress(OSError):
                        socket.send_fds(self._sock, [encode_request(StopUid(uid))], [done_w, go_r])
                        sent = True
        finally:
            os.close(done_w)
            os.close(go_r)
            if not sent:
                os.close(done_r)
                os.close(go_w)
        return (done_r, go_w) if sent else None

    def _stop_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._process is not None:
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
            self._process = None

    def stop(self) -> None:
        """Close the launcher; it kills the children it started and exits."""
        with self._lock:
            self._stop_locked()


def wait_readable(fd: int, deadline: float) -> bool:
    """Wait until `fd` has something to read (or is at its end); False once
    `deadline` (monotonic) passed first. poll, not select: host descriptors
    may be past select()'s 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if poller.poll(remaining * 1000):
            return True
