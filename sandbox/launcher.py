"""The launcher: a small single-threaded process that forks one child per call.

Everything in this module runs in the launcher process; the host's end of
its socket is `sandbox.launcher_client.Launcher`.

The host is multi-threaded and must never fork itself, so it starts this
process once, as a fresh interpreter (`python -E -s -c`, a bootstrap that
imports this module and calls `main`, started with subprocess's fork-exec,
which runs no Python code between the two), and asks it for children::

    host thread (sandbox.handle)   launcher (single thread)       child
    ----------------------------   ------------------------       -----
    Launcher.start_child(spec, fds)
      -- SEQPACKET: StartChild -->  recv ChildSpec + 5 descriptors
         + SCM_RIGHTS fds            fork() --------------------->  sandbox.child.main()
    read status pipe  <----------   write pid (8 bytes)            ... runs plugin ...
    wait on reply, stdout,                                          exits / is killed
    stderr and status pipes         relay pipe readable (PID namespace: init
                                    reports the plugin's exit) or SIGCHLD -> wait4()
    read status pipe  <----------   write wait status + maxrss
    status pipe at its end <-----   wait4(): reaped; close status pipe

The requests (StartChild, KillCall, KillUid, StopUid) and the status pipe's
PID and EXIT records are defined in `sandbox.protocol`; KillUid and StopUid
fork a helper that runs as the call's uid (`_fork_killer`, and
`_fork_stopper`, which keeps a warm child's call stopped until the host
continues it). The status pipe is the child's sentinel: its EXIT record
carries the raw wait status of the plugin's process as soon as it is known
(in a PID namespace, from the call's init, before init's own exit and the
namespace's teardown; in its uid's slot, from the launcher's own reap of
the child), and its end means the call is over: the child reaped, and its
slot cleaned by the slot's holder (`sandbox.layers.shared.Slot`), so the
host never polls. The launcher is a child subreaper: processes a plugin
leaves behind are re-parented to it when their parent dies, and it reaps
them all.
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
import dataclasses
import os
import resource
import select
import signal
import socket
import sys
import time

from sandbox import child, inherited, trace
from sandbox.layers import kernel
from sandbox.layers.shared import Shared, Slot, close_all_but
from sandbox.protocol import (
    CHILD_FDS,
    EXIT,
    MAX_REQUEST,
    PID,
    RELAYED_STATUS,
    SETUP_FAILED,
    ChildSpec,
    KillCall,
    KillUid,
    ProtocolError,
    StartChild,
    StopUid,
    decode_request,
)

# For every thread of a warm child's call to be stopped once the stopper
# signalled them (a thread in an uninterruptible wait stops when it leaves
# it); past it, the host puts the child away.
STOP_DEADLINE_S = 1.0
# Thread states that run no code: stopped (T), stopped by a tracer (t), dead.
STOPPED_STATES = frozenset(b"TtZX")
WAKE_READ = 4096  # bytes of the signal wake-up pipe read at once


def serve(sock: socket.socket) -> None:
    """Launcher main loop. Runs in the launcher process until the host leaves."""
    kernel.prctl(kernel.PR_SET_CHILD_SUBREAPER, 1)
    # No process between here and the plugin ever writes a core dump: not the
    # launcher, not a call's root-owned relay or init (whatever core limit the
    # service manager gave the host), before anything can crash.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    kernel.prctl(kernel.PR_SET_DUMPABLE, 0)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the host to handle
    state = _State(sock, (wake_r, wake_w), Shared())
    poller = select.poll()  # a busy launcher holds descriptors past select()'s 1024
    registered: set[int] = set()
    try:
        while True:
            relays = {fd: pid for pid, fd in state.relays.items()}
            wanted = {sock.fileno(), wake_r, *relays, *state.cleaning}
            for fd in registered - wanted:
                poller.unregister(fd)
            for fd in wanted - registered:
                poller.register(fd, select.POLLIN)
            registered = wanted
            readable = [fd for fd, _ in poller.poll()]
            for fd in readable:
                if fd in relays:
                    state.on_relay(relays[fd])
                elif fd in state.cleaning:
                    state.on_cleaned(fd)
            if wake_r in readable:
                state.on_signal()
            if sock.fileno() in readable:
                message, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, len(CHILD_FDS))
                if not message:
                    return
                trace.mark("launcher.recv")
                state.on_request(message, fds)
    finally:
        state.end_all()


class _State:
    """What the launcher knows of the children it started."""

    def __init__(self, sock: socket.socket, wake: tuple[int, int], shared: Shared) -> None:
        self.sock = sock
        self.wake = wake
        self.shared = shared  # namespaces made once for the calls (root only)
        self.children: dict[int, int] = {}  # pid -> its status pipe (write end)
        self.relays: dict[int, int] = {}  # pid of a call's child -> its relay pipe
        self.reported: set[int] = set()  # children whose EXIT record went out before their reap
        self.uids: dict[int, int] = {}  # pid of a call's child -> the call's uid
        self.calls: dict[str, int] = {}  # the host's token of a call -> its unreaped pid
        self.slotted: dict[int, Slot] = {}  # pid of a call's child -> the slot it is in
        # A slot's answer pipe -> (the slot, the status pipe of the call it cleans up after)
        self.cleaning: dict[int, tuple[Slot, int]] = {}

    def on_signal(self) -> None:
        """SIGCHLD woke the loop: reap, and forget the tokens of reaped calls."""
        _drain(self.wake[0])
        _reap(self)
        for token in [t for t, pid in self.calls.items() if pid not in self.children]:
            del self.calls[token]  # reaped: its pid may name another process soon

    def on_relay(self, pid: int) -> None:
        """A call's init (or relay) reported that the plugin's process exited:
        tell the host now. Init's own exit, the namespace's teardown and the
        reap come after; the status pipe's end then tells the host the call is
        reaped."""
        relay_fd = self.relays.pop(pid)
        try:
            relayed = os.read(relay_fd, RELAYED_STATUS.size)
        except BlockingIOError:
            relayed = b""
        os.close(relay_fd)
        if len(relayed) != RELAYED_STATUS.size:
            return  # it died first: its reap reports its own status
        status, maxrss = RELAYED_STATUS.unpack(relayed)
        _write_status(self.children[pid], EXIT.pack(status, maxrss))
        self.reported.add(pid)

    def clean(self, slot: Slot, status_fd: int) -> None:
        """A call in `slot` was reaped: have the slot's holder clean it; the
        call's status pipe ends once it has (`on_cleaned`)."""
        try:
            os.write(slot.control, b"c")
        except OSError:
            self.retire(slot, status_fd)
            return
        self.cleaning[slot.answer] = (slot, status_fd)

    def on_cleaned(self, answer: int) -> None:
        slot, status_fd = self.cleaning.pop(answer)
        try:
            cleaned = os.read(answer, 1) == b"1"
        except OSError:
            cleaned = False
        if cleaned:
            slot.busy = False
            os.close(status_fd)  # the host may give the uid to the next call
        else:
            self.retire(slot, status_fd)

    def holder_ended(self, pid: int) -> None:
        """A slot's holder ended on its own (killed from outside): forget the
        slot. Its namespaces, and everything in them, ended before its reap;
        a call it was cleaning up after is over."""
        slot = self.shared.holder_ended(pid)
        if slot is None:
            return
        _, status_fd = self.cleaning.pop(slot.answer, (0, -1))
        slot.close()
        if status_fd >= 0:
            os.close(status_fd)

    def retire(self, slot: Slot, status_fd: int) -> None:
        """`slot` could not be cleaned: end its namespaces. The call's status
        pipe ends when the holder is reaped, which is after every process of
        its PID namespace has ended."""
        self.shared.retire(slot)
        self.children[slot.holder] = status_fd
        self.reported.add(slot.holder)  # the call's EXIT record went out at its reap

    def on_request(self, message: bytes, fds: list[int]) -> None:
        """Serve one request; close every descriptor it brought and did not use."""
        try:
            request = decode_request(message)
        except ProtocolError:
            request = None  # not from our host: ignored, its descriptors closed
        trace.mark("launcher.decode")
        if isinstance(request, KillCall):
            pid = self.calls.get(request.token, 0)
            if pid in self.children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        elif isinstance(request, KillUid) and len(fds) == 1:
            _fork_killer(request.uid, fds.pop(), self.sock, self.children)
        elif isinstance(request, StopUid) and len(fds) == 2:
            (done_fd, go_fd), fds = fds, []
            _fork_stopper(request.uid, done_fd, go_fd)
        elif isinstance(request, StartChild) and len(fds) == len(CHILD_FDS):
            spec, named = request.spec, dict(zip(CHILD_FDS, fds, strict=True))
            fds = []
            pid = _fork_child(spec, named, self)
            if spec.uid:
                self.uids[pid] = spec.uid
            self.calls[spec.token] = pid
        for fd in fds:
            os.close(fd)
        for pid in [p for p in self.uids if p not in self.children]:
            del self.uids[pid]
            self.slotted.pop(pid, None)

    def end_all(self) -> None:
        """The host is gone: end every call still running, descendants included."""
        for uid in set(self.uids.values()):
            _fork_killer(uid, -1, self.sock, {})
        for slot in list(self.shared.slots.values()):
            self.shared.retire(slot)
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_all(deadline_s=2.0)


def _fork_child(spec: ChildSpec, named: dict[str, int], state: _State) -> int:
    """Fork the child of `spec` with the descriptors `named` (closed here)."""
    children, relays, shared = state.children, state.relays, state.shared
    relay_r, named["relay"] = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    given, root, slot = shared.give(spec)
    if root >= 0:
        named["root"] = os.dup(root)  # the child's own handle on its root's template
    spec = dataclasses.replace(spec, launcher_pid=os.getpid(), given=given)
    inherited.prepare(spec)
    trace.mark("launcher.pipe+prepare")
    try:
        pid = _fork_into(given, slot, spec, named, state)
    except OSError:
        if slot is None:
            raise
        # Its holder died (killed from outside): the namespace takes no new
        # process. The call gets a PID namespace of its own instead.
        shared.retire(slot)
        given, slot = tuple("pid" if name == "slot" else name for name in given), None
        spec = dataclasses.replace(spec, given=given)
        pid = _fork_into(given, slot, spec, named, state)
    for name, fd in named.items():
        if name != "status":
            os.close(fd)
    # If the host gave up on this call the write fails; the reap still happens.
    _write_status(named["status"], PID.pack(pid))
    trace.mark("launcher.fork+pid")
    children[pid] = named["status"]
    if slot is None:
        relays[pid] = relay_r
    else:  # the launcher's own child: its reap gives the plugin's status
        os.close(relay_r)
        state.slotted[pid] = slot
    return pid


def _fork_into(
    given: tuple[str, ...],
    slot: Slot | None,
    spec: ChildSpec,
    named: dict[str, int],
    state: _State,
) -> int:
    """Fork the call's child into the namespaces `given` (and `slot`'s); in
    the child, run it and never return."""
    other_pid_namespace = state.shared.pid_namespace_for_next_child(given, slot)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                # The child's first step (descriptors) closes every descriptor
                # it was not handed: the launcher's socket and pipes, the
                # other calls' and the namespaces'. (The socket object is
                # never closed nor freed here: the child never returns.)
                state.shared.join(given, slot)
            except BaseException:  # noqa: BLE001 - fail closed, never back into the launcher
                os._exit(SETUP_FAILED)
            child.main(spec, named)
    finally:
        if other_pid_namespace:
            state.shared.own_pid_namespace_again()
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


def _fork_stopper(uid: int, done_fd: int, go_fd: int) -> None:
    """Fork a process of `uid` that stops every other process of `uid`, and
    continues them when the host says so (a warm child's call between the
    end of its import and its hand-over: `sandbox.prewarm`).

    The stopper sends SIGSTOP with one `kill(-1)`, atomic against forks as
    the killer's SIGKILL is (a process forking at that moment stops, and so
    does its new child); then it waits until every thread of every process
    of `uid` is stopped, and answers b"1" on `done_fd` (b"0" when they are
    not within STOP_DEADLINE_S). It continues them all with one
    `kill(-1, SIGCONT)` when a byte arrives on `go_fd`, and exits; when
    `go_fd` ends without one (the host put the child away and kills it), it
    exits and leaves them stopped. Closes both descriptors here.
    """
    if uid <= 0:
        os.close(done_fd)
        os.close(go_fd)
        return
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # It lives until the hand-over: holding none of the launcher's
            # descriptors (other calls' status pipes end only once it exits).
            close_all_but({done_fd, go_fd})
            signal.set_wakeup_fd(-1)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            kernel.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change
            with contextlib.suppress(ProcessLookupError):  # none: nothing to stop
                os.kill(-1, signal.SIGSTOP)
            stopped = _all_stopped(uid, time.monotonic() + STOP_DEADLINE_S)
            os.write(done_fd, b"1" if stopped else b"0")
            if stopped and os.read(go_fd, 1):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(-1, signal.SIGCONT)
            code = 0
        finally:
            os._exit(code)
    os.close(done_fd)
    os.close(go_fd)


def _all_stopped(uid: int, deadline: float) -> bool:
    """In a stopper: True once no thread of another process of `uid` runs."""
    while not all(_threads_stopped(pid) for pid in _pids_of(uid) if pid != os.getpid()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _pids_of(uid: int) -> list[int]:
    """The processes whose real uid is `uid` (a call's processes are not
    dumpable, so /proc shows them owned by root: their status tells)."""
    found = []
    wanted = f"Uid:\t{uid}\t".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as status:
                if wanted in status.read():
                    found.append(int(name))
        except OSError:
            continue  # gone meanwhile
    return found


def _threads_stopped(pid: int) -> bool:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True  # gone
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as stat:
                # The state follows the command's closing parenthesis.
                state = stat.read().rpartition(b")")[2][1:2]
        except OSError:
            continue
        if state and state[0] not in STOPPED_STATES:
            return False
    return True


def _wait_all(deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)  # shutting down: nothing else to wait on


def _drain(fd: int) -> None:
    """Empty the (non-blocking) signal wake-up pipe. A read shorter than asked
    for emptied it: no exception is raised, and its pages written, on every
    wake-up to find that out."""
    try:
        while len(os.read(fd, WAKE_READ)) == WAKE_READ:
            continue
    except BlockingIOError:
        return  # woken with nothing to read


def _write_status(fd: int, record: bytes) -> None:
    """Write a record on a call's status pipe, whose reader may be gone (the
    host gave up on the call). A plain try: `contextlib.suppress` runs four
    Python calls, and in a forking process every page they touch is a fault."""
    try:
        os.write(fd, record)
    except OSError:
        return


def _reap(state: _State) -> None:
    children, relays, reported = state.children, state.relays, state.reported
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status_fd = children.pop(pid, None)
        if status_fd is None:
            state.holder_ended(pid)  # or an orphan a plugin left behind, re-parented to us
            continue
        maxrss = usage.ru_maxrss
        relay_fd = relays.pop(pid, None)  # none for a killer process or a slot's call
        if relay_fd is not None:
            try:
                # Init or a relay (PID namespace) exits 0 after writing the worker's status.
                relayed = os.read(relay_fd, RELAYED_STATUS.size)
            except BlockingIOError:
                relayed = b""
            os.close(relay_fd)
            if len(relayed) == RELAYED_STATUS.size and status == 0:
                status, maxrss = RELAYED_STATUS.unpack(relayed)
        if pid in reported:
            reported.discard(pid)  # its EXIT record went out already
        else:
            # The host may have closed its end already (it gave up on the call).
            _write_status(status_fd, EXIT.pack(status, maxrss))
        tree_cpu_ns = int((usage.ru_utime + usage.ru_stime) * 1e9)
        # Before the host can hear of it: the call tree's CPU and minor faults.
        trace.mark("launcher.reap", (tree_cpu_ns, usage.ru_minflt))
        slot = state.slotted.pop(pid, None)
        if slot is not None and state.shared.slots.get(slot.uid) is slot:
            state.clean(slot, status_fd)  # its status pipe ends once the slot is clean
        else:
            os.close(status_fd)


def main() -> None:
    """Entry point of the launcher process: `python -m sandbox.launcher FD`."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    if len(sys.argv) > 2:  # a measurement: record this launcher's and its calls' phases
        trace.enable(sys.argv[2])
    serve(sock)


if __name__ == "__main__":
    main()
