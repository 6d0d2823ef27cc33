"""The launcher: a small single-threaded process that forks one child per call.

The host is multi-threaded and must never fork itself, so it starts this
process once, as a fresh interpreter (`python -m sandbox.launcher`, started
with subprocess's fork-exec, which runs no Python code between the two), and
asks it for children::

    host thread                    launcher (single thread)       child
    -----------                    ------------------------       -----
    Launcher.start_child(spec, fds)
      -- SEQPACKET: JSON spec  -->  recv spec + 5 descriptors
         + SCM_RIGHTS fds            fork() --------------------->  sandbox.child.main()
    read status pipe  <----------   write pid (8 bytes)            ... runs plugin ...
    wait on reply, stdout,                                          exits / is killed
    stderr and status pipes         SIGCHLD -> wait4()
    read status pipe  <----------   write wait status + maxrss,
                                    close status pipe

The status pipe is the child's sentinel: it becomes readable when the child
has exited and been reaped, and carries the raw wait status, so the host
never polls. The launcher is a child subreaper: processes a plugin leaves
behind are re-parented to it when their parent dies, and it reaps them all.
When the host closes its end of the socket (or dies), the launcher kills
every child it started and exits. It never runs plugin code itself and never
decodes anything a child writes.

Why not multiprocess here: its `spawn` start re-imports the caller's
`__main__` in the new process (a script without a main guard would start
again), its forkserver unpickles inside every child before our limits apply,
cannot be made a subreaper and does not report resource usage with the exit
status. The fork loop below is short enough to read in full.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sandbox import child, isolation
from sandbox.outcome import HostFailure

PID = struct.Struct(">q")
EXIT = struct.Struct(">iq")  # raw wait status, peak RSS in KiB
FD_ORDER = ("status", "reply", "stdout", "stderr", "payload")
MAX_SPEC = 1 << 16


class LauncherError(HostFailure):
    """The launcher could not start a child (it died or refused)."""


def serve(sock: socket.socket) -> None:
    """Launcher main loop. Runs in the launcher process until the host leaves."""
    isolation.prctl(isolation.PR_SET_CHILD_SUBREAPER, 1)
    # No process between here and the plugin ever writes a core dump: not the
    # launcher, not a call's root-owned relay or init (whatever core limit the
    # service manager gave the host), before anything can crash.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    isolation.prctl(isolation.PR_SET_DUMPABLE, 0)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the host to handle
    children: dict[int, int] = {}
    relays: dict[int, int] = {}  # pid of a call's child -> read end of its relay pipe
    uids: dict[int, int] = {}  # pid of a call's child -> the call's uid
    calls: dict[str, int] = {}  # the host's token of a call -> its unreaped child's pid
    try:
        while True:
            readable, _, _ = select.select([sock.fileno(), wake_r], [], [])
            if wake_r in readable:
                while True:
                    try:
                        if not os.read(wake_r, 4096):
                            break
                    except BlockingIOError:
                        break
                _reap(children, relays)
                for token in [t for t, pid in calls.items() if pid not in children]:
                    del calls[token]  # reaped: its pid may name another process soon
            if sock.fileno() in readable:
                message, fds, _, _ = socket.recv_fds(sock, MAX_SPEC, len(FD_ORDER))
                if not message:
                    return
                request = json.loads(message)
                if request.get("op") == "kill_call":
                    for fd in fds:
                        os.close(fd)
                    pid = calls.get(str(request.get("token")), 0)
                    if pid in children:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                elif request.get("op") == "kill_uid" and len(fds) == 1:
                    _fork_killer(int(request["uid"]), fds[0], sock, children)
                else:
                    pid = _fork_child(request, fds, sock, children, relays, (wake_r, wake_w))
                    if pid and request.get("uid"):
                        uids[pid] = int(request["uid"])
                    if pid and request.get("token"):
                        calls[str(request["token"])] = pid
                for pid in [p for p in uids if p not in children]:
                    del uids[pid]
    finally:
        # The host is gone: end every call still running, descendants included.
        for uid in set(uids.values()):
            _fork_killer(uid, -1, sock, {})
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_all(deadline_s=2.0)


def _fork_child(
    spec: dict[str, Any],
    fds: list[int],
    sock: socket.socket,
    children: dict[int, int],
    relays: dict[int, int],
    wake: tuple[int, int],
) -> int:
    if len(fds) != len(FD_ORDER):
        for fd in fds:
            os.close(fd)
        return 0
    named = dict(zip(FD_ORDER, fds, strict=True))
    relay_r, named["relay"] = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    spec["launcher_pid"] = os.getpid()
    pid = os.fork()
    if pid == 0:
        sock.close()
        for fd in (*wake, named["status"], relay_r, *relays.values()):
            os.close(fd)
        child.main(spec, named)
    for name, fd in named.items():
        if name != "status":
            os.close(fd)
    # If the host gave up on this call the write fails; the reap still happens.
    with contextlib.suppress(OSError):
        os.write(named["status"], PID.pack(pid))
    children[pid] = named["status"]
    relays[pid] = relay_r
    return pid


def _fork_killer(uid: int, done_fd: int, sock: socket.socket, children: dict[int, int]) -> None:
    """Fork a process that kills every process of `uid`; `done_fd` gets its exit status."""
    # kill(-1) sent by a process of the call's own uid reaches every process of
    # that uid in one pass under the kernel's task-list lock: a process forking
    # at that moment cannot slip a new child past it, as it could past a scan
    # of /proc followed by one kill per pid.
    if uid <= 0:
        if done_fd >= 0:
            os.close(done_fd)
        return
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            sock.close()
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            code = 0  # nothing of that uid was left
        except BaseException:  # noqa: BLE001 - report any failure by exit code only
            code = 1
        os._exit(code)
    if done_fd >= 0:
        children[pid] = done_fd


def _wait_all(deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)  # shutting down: nothing else to wait on


def _reap(children: dict[int, int], relays: dict[int, int]) -> None:
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status_fd = children.pop(pid, None)
        if status_fd is None:
            continue  # an orphan a plugin left behind, re-parented to us
        relay_fd = relays.pop(pid, None)  # none for a killer process
        if relay_fd is not None:
            try:
                # A relay (PID namespace) exits 0 after writing the worker's status.
                relayed = os.read(relay_fd, child.STATUS.size)
            except BlockingIOError:
                relayed = b""
            os.close(relay_fd)
            if len(relayed) == child.STATUS.size and status == 0:
                (status,) = child.STATUS.unpack(relayed)
        # The host may have closed its end already (it gave up on the call).
        with contextlib.suppress(OSError):
            os.write(status_fd, EXIT.pack(status, usage.ru_maxrss))
        os.close(status_fd)


def main() -> None:
    """Entry point of the launcher process: `python -m sandbox.launcher FD`."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    serve(sock)


SOURCE_ROOT = str(Path(__file__).resolve().parent.parent)


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
        process = subprocess.Popen(
            [sys.executable, "-E", "-s", "-c", bootstrap, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=child.SAFE_ENV,  # the launcher starts as bare as the children it forks
        )
        theirs.close()
        self._process, self._sock = process, ours
        return ours

    def start(self) -> None:
        """Start the launcher now rather than at the first call (a host about
        to give up root starts it while it still can)."""
        with self._lock:
            self._ensure_started()

    def start_child(self, spec: dict[str, Any], fds: dict[str, int]) -> None:
        """Ask the launcher to fork a child for `spec` with the descriptors `fds`.

        `fds` maps every name of FD_ORDER to a descriptor; the caller keeps
        its own copies and closes them. Raises LauncherError if the launcher
        cannot be reached even after a restart.
        """
        message = json.dumps(spec).encode()
        ordered = [fds[name] for name in FD_ORDER]
        with self._lock:
            for attempt in (1, 2):
                sock = self._ensure_started()
                try:
                    socket.send_fds(sock, [message], ordered)
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
                self._sock.send(json.dumps({"op": "kill_call", "token": token}).encode())

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
                    socket.send_fds(
                        self._sock, [json.dumps({"op": "kill_uid", "uid": uid}).encode()], [done_w]
                    )
                except OSError:
                    return False
            os.close(done_w)
            done_w = -1
            poller = select.poll()  # host descriptors may be past select()'s 1024
            poller.register(done_r, select.POLLIN)
            if not poller.poll(timeout_s * 1000):
                return False
            data = os.read(done_r, EXIT.size)
            return len(data) == EXIT.size and os.waitstatus_to_exitcode(EXIT.unpack(data)[0]) == 0
        finally:
            os.close(done_r)
            if done_w >= 0:
                os.close(done_w)

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


if __name__ == "__main__":
    main()
