"""The host's handles on its children and on the launcher that forks them (runs in the host).

As `multiprocessing.popen_fork.Popen` does for a forked process, a
`ChildHandle` owns one sandbox child's resources and is the only thing that
touches them::

    ChildHandle.spawn(launcher, call, layers, uid, scratch, warm)
        uid and scratch handed in and owned from here; the call's cgroup made;
        cold: the payload now; warm: set up, waiting -> .begin_stop() once it
        has imported its plugin, .stop_answer(), then .hand_over(call):
        continued, its payload
        -> the launcher forks the child
      .fds            read ends: status, reply, stdout, stderr
      .read_status()  the status pipe's one reader (the pid, then the
                      launcher's EXIT report -> .exit, then its end); the
                      watch calls it when the pipe is readable, .wait_exit()
                      waits on it
      .sample_memory()  .memory_at_end()
      .kill()         every process of the call (launcher by token, by uid, sweep)
      .finish()       the verdict is final: the call ends on its own
      .close()        kill what is left, remove the cgroup and scratch, close
                      every descriptor, give the uid back

`.state` is where the handle is in its life (`HandleState`), moved in one
place (`ChildHandle._to`) along `MOVES`, which refuses any other move::

    NEW -> RUNNING (cold)                         -> ENDING (finish)
    NEW -> IMPORTING -> WAITING -> STOPPING -> STOPPED -> RUNNING (hand_over)
                                (uid None: WAITING -> STOPPED; not stopped
                                 in time: STOPPING -> WAITING, put away)
    any live state -> EXITED (the exit report) -> REAPED (the pipe's end)
                   -> GONE (the pipe's end before any report: no launcher)
    every other state -> CLOSED (close)

Whoever watches a call (`sandbox.call`) talks to the handle only. The
handle reaches the launcher process through `Launcher`, the host's end of
its socket (the launcher's own loop is `sandbox.launcher`).
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import sys
import sysconfig
import time
import uuid
from enum import Enum

from sandbox import trace
from sandbox.cgroups import CallCgroup, CgroupPool
from sandbox.launcher_client import Launcher, wait_readable
from sandbox.limits import MiB
from sandbox.outcome import HostFailure
from sandbox.processes import CallProcesses
from sandbox.protocol import (
    EXIT,
    PID,
    CallSpec,
    ChildExit,
    ChildSpec,
    Payload,
    write_payload,
)

# The interpreter and its standard library. Not the host environment's
# packages: a plugin imports its own (CallSpec.import_paths).
INTERPRETER_PATHS = (sys.base_prefix,)


def _site_dirs() -> tuple[str, ...]:
    """Package directories inside INTERPRETER_PATHS that calls must not see:
    the base interpreter's site-packages and a distribution's dist-packages."""
    base = {"base": sys.base_prefix, "platbase": sys.base_prefix}
    paths = sysconfig.get_paths(vars=base)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [
        paths["purelib"],
        paths["platlib"],
        "/usr/lib/python3/dist-packages",
        f"/usr/local/lib/{version}/dist-packages",
        f"/usr/lib/{version}/dist-packages",
    ]
    return tuple(sorted({os.path.realpath(p) for p in candidates if os.path.isdir(p)}))


# Covered by an empty read-only tmpfs in every call's minimal root.
HIDDEN_SITE_DIRS = _site_dirs()
PIPES = ("status", "reply", "stdout", "stderr")
# The memory cgroup is the hard stop behind the watchdog, 5% above the limit:
# a bomb faster than the 20 ms sampling still cannot get further. The page
# cache it also counts is reclaimed before the kernel kills for memory.
CGROUP_MEMORY_SLACK = 1.05
CGROUP_EXTRA_PROCESSES = 2  # a PID namespace's init and (unprivileged host) its relay
# How long the launcher may take to report a new child's pid, beyond the call's timeout.
PID_GRACE_S = 5.0
# After the verdict, how long the call's processes may take to end on their own.
EXIT_GRACE_S = 0.5
# After a kill, how long the launcher's report that the child is reaped may take.
REAP_WAIT_S = 2.0
# For the launcher's stopper to report a warm child's call stopped (it gives
# the threads 1 s, `sandbox.launcher.STOP_DEADLINE_S`, after its own start).
STOP_WAIT_S = 2.0


def exposed_paths(plugin_dir: str, import_paths: tuple[str, ...] = ()) -> tuple[str, ...]:
    """What the child may read: INTERPRETER_PATHS, the plugin and its
    environment. Never the rest of the host's `sys.path` (its working
    directory, the host's own source, the host's packages)."""
    return (*INTERPRETER_PATHS, plugin_dir, *import_paths)


class HandleState(Enum):
    """Where a `ChildHandle` is in its life; `MOVES` says what may follow what."""

    NEW = "new"  # made: nothing forked yet
    IMPORTING = "importing"  # warm: forked; being set up, then importing its plugin
    WAITING = "waiting"  # warm: said "w" on its socket: set up, imported, waiting
    STOPPING = "stopping"  # warm: its call's stop asked for, not answered yet
    STOPPED = "stopped"  # warm: nothing of its call runs until hand_over
    RUNNING = "running"  # a call runs on it: cold from its fork, warm from hand_over
    ENDING = "ending"  # the verdict is final: the call ends on its own (finish)
    EXITED = "exited"  # the launcher reported the plugin's process exited
    REAPED = "reaped"  # the status pipe ended after the exit report
    GONE = "gone"  # the status pipe ended before any exit report: the launcher is gone
    CLOSED = "closed"  # put away: every resource given back


_S = HandleState
# Every move a handle makes; any other is refused (HandleStateError). The
# status pipe (the launcher's exit report, its end) may speak in any live state.
MOVES: dict[HandleState, frozenset[HandleState]] = {
    _S.NEW: frozenset({_S.IMPORTING, _S.RUNNING, _S.GONE, _S.CLOSED}),
    _S.IMPORTING: frozenset({_S.WAITING, _S.EXITED, _S.GONE, _S.CLOSED}),
    _S.WAITING: frozenset({_S.STOPPING, _S.STOPPED, _S.EXITED, _S.GONE, _S.CLOSED}),
    # Not stopped in time: back to waiting, never handed a call (put away).
    _S.STOPPING: frozenset({_S.STOPPED, _S.WAITING, _S.EXITED, _S.GONE, _S.CLOSED}),
    _S.STOPPED: frozenset({_S.RUNNING, _S.EXITED, _S.GONE, _S.CLOSED}),
    _S.RUNNING: frozenset({_S.ENDING, _S.EXITED, _S.GONE, _S.CLOSED}),
    _S.ENDING: frozenset({_S.EXITED, _S.GONE, _S.CLOSED}),
    _S.EXITED: frozenset({_S.REAPED, _S.CLOSED}),
    _S.REAPED: frozenset({_S.CLOSED}),
    _S.GONE: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}
# The call's processes end on their own: `close` waits for their reap first.
_ENDING_ON_THEIR_OWN = frozenset({_S.ENDING, _S.EXITED, _S.REAPED})
# A warm child that said "w" (and has not run a call since).
_SAID_WAITING = frozenset({_S.WAITING, _S.STOPPING, _S.STOPPED})


class HandleStateError(RuntimeError):
    """A move `MOVES` does not allow: a bug in the host, never the plugin's doing."""


class ChildHandle:
    """One sandbox child and the uid, cgroup, scratch, processes and
    descriptors the host holds for it. Not thread-safe: one call (or the
    warm pool) owns it at a time."""

    def __init__(
        self,
        launcher: Launcher,
        uid: int | None,
        lock_fd: int,
        cgroups: CgroupPool,
        scratch: str | None,
        pid_namespace: bool,
    ) -> None:
        self.launcher = launcher
        self.uid = uid
        self._lock_fd = lock_fd
        self._cgroups = cgroups
        self.cgroup: CallCgroup | None = None  # taken by start
        self.scratch = scratch
        self.pid_namespace = pid_namespace
        self.token = uuid.uuid4().hex  # the launcher's name for this child
        self.fds: dict[str, int] = {}
        self.procs: CallProcesses | None = None
        self.state = HandleState.NEW  # moved by `_to` alone
        self.exit: ChildExit | None = None  # the launcher's exit report, once read
        self.created = time.monotonic()
        self._opened: list[int] = []
        self._payload_socket: socket.socket | None = None  # a warm child's
        self._status = bytearray()  # read from the status pipe, not yet parsed
        self.timeout_s = 0.0  # the call's (a warm child's: its plugin's) time limit
        self._go = -1  # a stopped warm child's: one byte continues its call
        self._stop_answer = -1  # where the stopper says b"1" once the call is stopped
        self.stop_began = 0.0
        self.import_began = 0.0  # a warm child's ready frame came: set up, importing

    def _to(self, state: HandleState) -> None:
        """Move to `state`; refuse a move `MOVES` does not allow."""
        if state not in MOVES[self.state]:
            raise HandleStateError(
                f"a child's handle cannot go from {self.state.name} to {state.name}"
            )
        self.state = state

    @property
    def pid(self) -> int:
        return self.procs.root_pid if self.procs is not None else 0

    @property
    def stopped(self) -> bool:
        """A warm child: nothing of its call runs until `hand_over`."""
        return self.state is HandleState.STOPPED

    @property
    def reaped(self) -> bool:
        """The status pipe ended after the exit report: the launcher reaped the child."""
        return self.state is HandleState.REAPED

    @property
    def closed(self) -> bool:
        """Put away: every resource given back."""
        return self.state is HandleState.CLOSED

    @classmethod
    def spawn(
        cls,
        launcher: Launcher,
        call: CallSpec,
        layers: dict[str, bool],
        uid: int | None,
        lock_fd: int,
        cgroups: CgroupPool,
        scratch: str | None,
        warm: bool,
        sweep: bool = False,
    ) -> ChildHandle:
        """A handle on a new child for `call` (see `start`), owning `uid`
        (and its `lock_fd`) and `scratch` from now on; `sweep` first kills
        whatever still runs under `uid`. Raises what `start` raises, after
        putting away whatever was made."""
        handle = cls(launcher, uid, lock_fd, cgroups, scratch, layers["pid_namespace"])
        try:
            if sweep:
                handle.kill()  # leftovers of a host that died
            handle.start(call, layers, warm)
        except BaseException:
            handle.close()
            raise
        return handle

    def start(self, call: CallSpec, layers: dict[str, bool], warm: bool) -> None:
        """Have the launcher fork the child: cold (the payload handed over
        now) or `warm` (set up, then waiting for `hand_over`). Returns once
        the launcher reported the pid. Raises LauncherError, OSError or
        RuntimeError; `close` then puts away whatever was made."""
        trace.mark("host.handle_new")
        self.timeout_s = call.limits.timeout_s
        pipes = {name: os.pipe2(os.O_CLOEXEC) for name in PIPES}
        self._opened.extend(fd for pair in pipes.values() for fd in pair)
        trace.mark("host.pipes")
        if warm:
            self._payload_socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            payload_fd = theirs.detach()
        else:
            payload_fd = _payload_file(call)
        self._opened.append(payload_fd)
        trace.mark("host.payload_memfd")
        self.cgroup = self._cgroups.take(
            self.uid,
            memory_bytes=int(call.limits.memory_mb * MiB * CGROUP_MEMORY_SLACK),
            max_processes=call.limits.max_processes + CGROUP_EXTRA_PROCESSES,
        )
        trace.mark("host.cgroup_take")
        spec = ChildSpec(
            plugin_dir=call.plugin_dir,
            entrypoint=call.entrypoint,
            limits=call.limits,
            layers=layers,
            expose=exposed_paths(call.plugin_dir, call.import_paths),
            hide=HIDDEN_SITE_DIRS,
            import_paths=call.import_paths,
            import_root=call.import_root,
            scratch=self.scratch,
            uid=self.uid,
            gid=self.uid,
            cgroup_procs=tuple(self.cgroup.procs_files),
            memory_counted=self.cgroup.counts_memory,
            warm=warm,
            token=self.token,
        )
        self.launcher.start_child(
            spec, {**{name: pair[1] for name, pair in pipes.items()}, "payload": payload_fd}
        )
        for fd in [pair[1] for pair in pipes.values()] + [payload_fd]:
            self._close_own(fd)
        self.fds = {name: pair[0] for name, pair in pipes.items()}
        trace.mark("host.close_sent_fds")
        pid = self._read_pid(time.monotonic() + call.limits.timeout_s + PID_GRACE_S)
        self.procs = CallProcesses(pid, self.uid, token=self.token)
        self._to(HandleState.IMPORTING if warm else HandleState.RUNNING)
        trace.mark("host.wait_pid")

    def begin_stop(self) -> bool:
        """Have every process and thread of a warm child's call stopped
        until `hand_over` (the child has imported its plugin: whatever the
        import started, threads or processes, waits with it); returns at
        once, and `stop_answer` tells when it is done. A child without a
        uid of its own has run no plugin code (it imports its plugin only
        once its payload is there, `sandbox.child`): nothing to stop, it is
        stopped at once. False when the launcher is gone."""
        self.stop_began = time.monotonic()
        if self.uid is None:
            self._to(HandleState.STOPPED)
            return True
        fds = self.launcher.stop_uid(self.uid)
        if fds is None:
            return False
        self._stop_answer, self._go = fds
        self._opened.extend(fds)
        self._to(HandleState.STOPPING)
        return True

    @property
    def stopping(self) -> bool:
        """Its stop was asked for and not answered yet."""
        return self.state is HandleState.STOPPING

    def stop_answer(self) -> bool | None:
        """The stopper's answer, once it came: True when every thread of the
        call is stopped; False when they were not in time (put it away and
        never hand it a call); None while it has not answered."""
        if not _readable(self._stop_answer):
            return None
        answer = os.read(self._stop_answer, 1)
        self._close_own(self._stop_answer)
        self._stop_answer = -1
        self._to(HandleState.STOPPED if answer == b"1" else HandleState.WAITING)
        return self.stopped

    def hand_over(self, call: CallSpec) -> None:
        """Continue a warm child's stopped call (`begin_stop`) and give it the
        payload of `call` (a sealed memfd over its socket). Raises HostFailure
        when its call cannot be continued (the launcher's stopper is gone),
        HandleStateError when it is not a stopped warm child."""
        if self.state is not HandleState.STOPPED or self._payload_socket is None:
            raise HandleStateError(f"a {self.state.name} child's handle is handed no call")
        if self._go >= 0:
            try:
                os.write(self._go, b"c")
            except OSError as exc:
                raise HostFailure(f"a warm child could not be continued: {exc}") from exc
            finally:
                self._close_own(self._go)
                self._go = -1
        payload_fd = _payload_file(call)
        try:
            socket.send_fds(self._payload_socket, [b"go"], [payload_fd])
        finally:
            os.close(payload_fd)
        self._to(HandleState.RUNNING)

    def _close_own(self, fd: int) -> None:
        os.close(fd)
        self._opened.remove(fd)

    def _read_pid(self, deadline: float) -> int:
        """The launcher's first record on the status pipe (`read_status`
        reads it, never past it: the exit report is the watch's to read)."""
        while len(self._status) < PID.size:
            if not wait_readable(self.fds["status"], deadline):
                raise RuntimeError("launcher did not report the child's pid in time")
            if not self.read_status(PID.size - len(self._status)):
                raise RuntimeError("launcher closed the status pipe before reporting a pid")
        (pid,) = PID.unpack(self._status)
        self._status.clear()
        return int(pid)

    # -- waiting -------------------------------------------------------------

    def set_up(self) -> bool:
        """True once a warm child said it is set up, has imported its plugin
        (with a uid of its own; else it imports it after the hand-over) and
        waits for its payload. Only the warm pool's keeper asks."""
        sock = self._payload_socket
        if self.state is HandleState.IMPORTING and sock is not None and _readable(sock.fileno()):
            if sock.recv(1) == b"w":
                self._to(HandleState.WAITING)
        return self.state in _SAID_WAITING

    def heard(self) -> bool:
        """Whether a warm child's payload socket has something to read: "w"
        (`set_up`), anything else, or its end."""
        sock = self._payload_socket
        said_waiting = self.state in _SAID_WAITING
        return said_waiting or (sock is not None and _readable(sock.fileno()))

    def note_import(self, now: float) -> None:
        """Note when a warm child began to import its plugin: when its ready
        frame (written once it is set up) is on the reply pipe. The frame
        stays there for the call's watch to read."""
        if not self.import_began and _readable(self.fds["reply"]):
            self.import_began = now

    def watched_fds(self) -> list[int]:
        """What a warm child's keeper polls: its reply pipe until the ready
        frame is there, its payload socket until it said "w" there, then the
        stopper's answer until it came; and its status pipe (it died)."""
        sock = self._payload_socket
        if self.stopped or sock is None:
            watched = []
        elif self.stopping:
            watched = [self._stop_answer]
        else:
            watched = [] if self.state in _SAID_WAITING else [sock.fileno()]
            watched += [] if self.import_began else [self.fds["reply"]]
        return watched + [self.fds["status"]] if "status" in self.fds else watched

    def held_fds(self) -> int:
        """Descriptors of the host's that this handle holds open now."""
        held = len(self._opened) + (self._payload_socket is not None)
        return held + (self.uid is not None and self._lock_fd >= 0)

    def alive(self) -> bool:
        """False once the child has exited (its status pipe has something to say)."""
        fd = self.fds.get("status")
        return fd is not None and self.exit is None and not _readable(fd)

    def read_status(self, most: int = 65536) -> bool:
        """Read what the status pipe has now (call it once the pipe is
        readable; at most `most` bytes): the only reader of the status pipe,
        for the pid (`start`), the watch (`sandbox.call`) and `wait_exit`.
        The launcher's exit report moves the handle to EXITED (`exit` then
        holds it); the pipe's end after it to REAPED (the launcher reaped
        the child), before it to GONE (the launcher is gone). False once the
        pipe is at its end."""
        try:
            data = os.read(self.fds["status"], most)
        except BlockingIOError:
            return True
        if not data:
            ended = HandleState.REAPED if self.exit is not None else HandleState.GONE
            if self.state is not ended:  # read at its end again: nothing new
                self._to(ended)
            return False
        self._status += data
        past_pid = self.state is not HandleState.NEW  # start reads the pid record alone
        if past_pid and self.exit is None and len(self._status) >= EXIT.size:
            self.exit = ChildExit(*EXIT.unpack_from(self._status))
            self._to(HandleState.EXITED)
        return True

    def wait_exit(self, deadline: float, reaped: bool = False) -> None:
        """Wait until the launcher reports the plugin's process exited (with
        `reaped`, until the child is reaped too), or `deadline` (monotonic)
        passes, or the launcher is gone; `exit` and `state` tell which."""
        fd = self.fds.get("status")
        if fd is None:
            return
        goal = {HandleState.REAPED} if reaped else {HandleState.EXITED, HandleState.REAPED}
        while self.state not in goal:
            if not wait_readable(fd, deadline) or not self.read_status():
                return

    # -- memory --------------------------------------------------------------

    def sample_memory(self) -> tuple[int, bool]:
        """Memory of the call's whole tree now, in bytes: the cgroup's count
        (each page once, tmpfs included) or, without one, the summed RSS;
        and whether the kernel OOM-killed a process of the call at its
        memory cgroup."""
        usage, oom_killed = self.cgroup.sample() if self.cgroup is not None else (None, False)
        if usage is None:
            usage = self.procs.total_rss() if self.procs is not None else 0
        return usage, oom_killed

    @property
    def memory_counted(self) -> bool:
        """Whether a memory cgroup counts (and limits) the call's pages."""
        return self.cgroup is not None and self.cgroup.counts_memory

    def memory_at_end(self) -> tuple[bool, int | None]:
        """Once the call is over: whether the kernel OOM-killed a process of
        it at its memory cgroup, and the cgroup's own peak in bytes (page
        cache included) where the kernel keeps one."""
        if self.cgroup is None:
            return False, None
        return self.cgroup.at_end()

    # -- ending --------------------------------------------------------------

    def kill(self) -> None:
        """Kill every process of the call: its root (which may still be in its
        root-owned setup, out of reach of the kill by uid), atomically by uid,
        then a sweep to verify.

        The root is killed by the launcher, which reaps it and so knows
        whether its pid still names it: a kill by pid from here could land on
        an unrelated process once the launcher had reaped the call and the
        pid was reused (pid_max is 32768 on many machines).
        """
        procs = self.procs or (CallProcesses(0, self.uid) if self.uid is not None else None)
        if procs is None:
            return
        if procs.token:
            self.launcher.kill_call(procs.token)
        if procs.uid is not None:
            self.launcher.kill_uid(procs.uid)
        procs.kill_all()

    def finish(self) -> None:
        """The verdict is final: from here the call's processes end on their
        own (the plugin's process exits right after its reply; its slot's
        holder, or its init, then kills whatever is left in its PID namespace).
        `close` gives them EXIT_GRACE_S, then kills what lingers. Nothing
        to note once the status pipe told the child's end (EXITED, REAPED,
        GONE)."""
        if self.state not in (HandleState.EXITED, HandleState.REAPED, HandleState.GONE):
            self._to(HandleState.ENDING)

    def close(self) -> None:
        """Kill what is left of the call and give back its uid, cgroup,
        scratch and descriptors once its processes are gone. Safe after a
        failed start too; a second call does nothing."""
        if self.closed:
            return
        # The status pipe's end ("reaped") means the call's PID namespace
        # holds nothing of it: its slot's holder found it empty, or its init
        # was reaped, which the kernel allows only once everything in the
        # namespace is gone. The plugin's exit is reported before that.
        if self.pid_namespace and self.procs and self.state in _ENDING_ON_THEIR_OWN:
            self.wait_exit(time.monotonic() + EXIT_GRACE_S, reaped=True)
            # It lingers: SIGKILL its child (the slot's clean-up, or its init's end, follows).
            if not self.reaped:
                self.launcher.kill_call(self.procs.token)
                self.wait_exit(time.monotonic() + REAP_WAIT_S, reaped=True)
        if not (self.reaped and self.pid_namespace):
            self.kill()
        trace.mark("host.close_kill")
        if self.cgroup is not None:
            self._cgroups.give_back(self.cgroup)
        trace.mark("host.cgroup_give_back")
        if self._payload_socket is not None:
            self._payload_socket.close()
            self._payload_socket = None
        for fd in [*self._opened]:
            self._close_own(fd)
        self.fds = {}
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        trace.mark("host.close_fds_scratch")
        if self.uid is not None:
            os.close(self._lock_fd)  # the uid's lock: free for another call
            self._lock_fd = -1
        self._to(HandleState.CLOSED)


def _payload_file(call: CallSpec) -> int:
    return write_payload(Payload(call.image, call.mime_type, call.options))


def _readable(fd: int) -> bool:
    """Whether `fd` has something to read now (poll: any descriptor number,
    where select stops at 1024)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))
