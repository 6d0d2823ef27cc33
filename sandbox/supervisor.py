"""Runs one plugin call in a child and watches it until a verdict.

Data flow of `Sandbox.execute` (one host thread per call)::

    cold:  uid, cgroup, pipes, payload memfd --> Launcher.start_child --> fork
    warm:  a child forked earlier the same way, set up and waiting
           payload memfd --> its socket (the hand-over)

    status pipe: pid, later the wait status  <---  launcher (reaps the child)
    reply pipe:  ready frame, final frame    <---  child
    stdout/stderr pipes: capped, tail kept   <---  child

    loop: selectors.select(min(deadline, next watchdog sample))
        reply bytes  -> FrameReader (size checked before the body)
        status bytes -> child exited: exit status known
        cancel token -> verdict "cancelled"
        watchdog     -> memory of the call's whole tree (cgroup, or summed RSS)
        deadline     -> kill, verdict "timeout"
    finally: kill what is left of the call, remove its cgroup and scratch,
             free its uid; start a warm child for the next call to this plugin

The deadline is on the monotonic clock and counts from the fork (cold) or
the hand-over (warm), so the plugin's import counts against it. Nothing read
from a child is unpickled.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox import cgroup2
from sandbox.cancel import CancelToken, current_token
from sandbox.cgroups import HOSTS_DIR, CallCgroup, call_cgroup_name, sweep_stale
from sandbox.child import SETUP_FAILED, describe_exit
from sandbox.launcher import EXIT, PID, Launcher
from sandbox.layers import CGROUP_V1, detect
from sandbox.limits import CallLimits, MiB
from sandbox.outcome import HostFailure, Outcome, Status
from sandbox.prewarm import Slot, WarmPool
from sandbox.processes import LOCK_DIR, CallProcesses, UidPool
from sandbox.protocol import (
    ErrorMessage,
    FrameReader,
    ProtocolError,
    encode_frame,
    parse_ready,
    parse_reply,
)

WATCHDOG_INTERVAL_S = 0.02
# The memory cgroup is the hard stop behind the watchdog, 5% above the limit:
# a bomb faster than the 20 ms sampling still cannot get further. The page
# cache it also counts is reclaimed before the kernel kills for memory.
CGROUP_MEMORY_SLACK = 1.05
TAIL_BYTES = 2048
# After the final frame, how long the child may take to exit before it is killed.
EXIT_GRACE_S = 0.5


@dataclass(frozen=True)
class CallSpec:
    """Everything the sandbox needs for one call."""

    plugin: str
    plugin_dir: str
    entrypoint: str
    limits: CallLimits
    image: bytes
    mime_type: str
    options: dict[str, Any]
    # The plugin's own environment (its declared packages), searched after
    # its directory; the host's site-packages never are.
    import_paths: tuple[str, ...] = ()
    # Where the entrypoint's module is imported from, when not plugin_dir: the
    # parent of an installed plugin package (only plugin_dir itself is exposed).
    import_root: str | None = None


@dataclass
class _Stream:
    fd: int
    total: int = 0
    tail: bytearray = field(default_factory=bytearray)

    def add(self, data: bytes) -> None:
        self.total += len(data)
        self.tail += data
        del self.tail[:-TAIL_BYTES]

    def text(self) -> str:
        return self.tail.decode("utf-8", "replace")[-TAIL_BYTES:]


class _Verdict(Exception):
    """Ends the watch loop with an outcome (raised inside `_watch`)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


def _stopped(reason: str, message: str, **details: Any) -> _Verdict:
    return _Verdict(
        Outcome(Status.SANDBOX_STOPPED, reason=reason, message=message, details=details)
    )


# Layers applied when this machine offers them, in the order of sandbox/child.py.
OPTIONAL_LAYERS = (
    "privilege_drop",
    "user_namespace",
    "no_new_privs",
    "mount_namespace",
    "tmpfs_scratch",
    "network_namespace",
    "ipc_namespace",
    "uts_namespace",
    "pid_namespace",
    "landlock",
    "seccomp",
    "cgroup_memory",
    "cgroup_pids",
)
# The namespaces need root or a user namespace: without either there is no
# per-call uid, minimal root or tmpfs scratch. A root host does not use a
# user namespace (its calls get host uids of their own; SECURITY.md says why).
DEPENDS_ON_PRIVILEGE_DROP = (
    "mount_namespace",
    "tmpfs_scratch",
    "network_namespace",
    "ipc_namespace",
    "uts_namespace",
    "pid_namespace",
)
ISOLATION_LEVELS = ("standard", "strict")
CGROUP_EXTRA_PROCESSES = 2  # the relay and init of a PID namespace
log = logging.getLogger("plughost.sandbox")


def _warm_key(call: CallSpec) -> tuple[Any, ...]:
    return (call.plugin_dir, call.entrypoint, call.limits, call.import_paths, call.import_root)


class Sandbox:
    """Executes calls, one fresh child process each; safe to share between threads.

    isolation: "standard" applies every layer this machine offers and logs a
        warning once for each one it lacks; "strict" refuses to run plugins
        (InternalError) while any layer is missing.
    disabled: layers switched off on purpose (names from OPTIONAL_LAYERS).
    prewarm: children kept set up and waiting, per plugin recently called, so
        a call pays a hand-over instead of a start (each is still used once).
    """

    def __init__(
        self,
        launcher: Launcher | None = None,
        scratch_root: str | None = None,
        isolation: str = "standard",
        disabled: Iterable[str] = (),
        prewarm: int = 0,
    ) -> None:
        if isolation not in ISOLATION_LEVELS:
            raise ValueError(f"isolation must be one of {ISOLATION_LEVELS}, not {isolation!r}")
        unknown = set(disabled) - set(OPTIONAL_LAYERS)
        if unknown:
            raise ValueError(f"unknown isolation layers: {', '.join(sorted(unknown))}")
        self.launcher = launcher or Launcher()
        self.isolation = isolation
        self._disabled = frozenset(disabled)
        self._layers: dict[str, bool] | None = None
        self._layers_lock = threading.Lock()
        self._uids: UidPool | None = None
        self._cgroup2: Path | None = None  # where call cgroups go on cgroup v2
        self._swept: set[int] = set()  # uids checked for leftovers of an earlier host
        self._scratch_root = scratch_root
        self.prewarm = prewarm
        self.warm = WarmPool(prewarm, release=lambda slot: self._release(slot, None))

    def layers(self) -> dict[str, bool]:
        """Optional layers calls get here: detected once, minus the disabled ones."""
        with self._layers_lock:
            if self._layers is None:
                found = detect()
                layers = {
                    name: bool(found.get(name)) and name not in self._disabled
                    for name in OPTIONAL_LAYERS
                }
                if not (found.get("cgroup_memory") or found.get("cgroup_pids")):
                    # No v1 controllers: per-call cgroups in the unified hierarchy.
                    self._cgroup2 = cgroup2.usable()
                    for name in ("cgroup_memory", "cgroup_pids"):
                        layers[name] = self._cgroup2 is not None and name not in self._disabled
                    if self._cgroup2 is not None:
                        log.info("per-call cgroups: cgroup v2 below %s", self._cgroup2)
                if layers["privilege_drop"]:
                    layers["user_namespace"] = False  # not needed, so never missing
                elif not layers["user_namespace"]:
                    for name in DEPENDS_ON_PRIVILEGE_DROP:
                        layers[name] = False
                for name in _missing(layers):
                    if self.isolation == "standard":
                        why = "switched off" if name in self._disabled else "not available here"
                        log.warning("isolation layer %s is %s; calls run without it", name, why)
                if layers["privilege_drop"]:
                    self._uids = UidPool()
                stale = sweep_stale(layers, self._cgroup2)
                if stale:
                    log.info("removed %d cgroups left by hosts that were killed", stale)
                self._layers = layers
            return dict(self._layers)

    def protections(self) -> dict[str, bool]:
        """Which isolation layers calls actually get on this host (a root
        host's user namespace, which it does not need, is left out)."""
        layers = self.layers()
        missing = _missing(layers)
        return {
            "fresh_process_per_call": True,
            "rlimits": True,
            "own_session": True,
            "scrubbed_environment": True,
            "memory_watchdog": True,
            **{name: on for name, on in layers.items() if on or name in missing},
        }

    def execute(self, call: CallSpec) -> Outcome:
        """Run `call` in a fresh child and return its outcome.

        Kills and reaps every process of the call before it returns, also when
        the calling thread is interrupted. Raises HostFailure for host-side
        failures (no uid free, the launcher unreachable or gone, limits that
        cannot be applied, a layer missing in strict mode), which the
        ToolRunner reports.
        """
        token = current_token()
        if token is not None and token.cancelled:
            return Outcome(Status.SANDBOX_STOPPED, reason="cancelled", message="call was cancelled")
        layers = self.layers()
        missing = _missing(layers)
        if self.isolation == "strict" and missing:
            raise HostFailure(
                "isolation level strict: missing layers " + ", ".join(missing),
                {"missing_layers": missing},
            )
        slot = self.warm.take(_warm_key(call)) if self.prewarm else None
        if slot is None:
            slot = self._start(call, layers, warm=False)
        watch: _Watch | None = None
        try:
            started = time.monotonic()
            if slot.go is not None:
                payload_fd = self._payload_file(call)
                try:
                    socket.send_fds(slot.go, [b"go"], [payload_fd])
                finally:
                    os.close(payload_fd)
            assert slot.procs is not None  # _start reads the pid before it returns
            watch = _Watch(
                call, slot.read_ends, slot.procs, started, self._kill, token, slot.cgroup
            )
            return watch.until_verdict()
        finally:
            self._release(slot, watch)
            if self.prewarm:
                template = CallSpec(
                    call.plugin,
                    call.plugin_dir,
                    call.entrypoint,
                    call.limits,
                    b"",
                    "",
                    {},
                    call.import_paths,
                    call.import_root,
                )
                self.warm.fill(_warm_key(call), lambda: self._start(template, layers, warm=True))

    def _start(self, call: CallSpec, layers: dict[str, bool], warm: bool) -> Slot:
        """Fork a child for `call`: cold (payload handed over now) or warm
        (set up and waiting for its payload on a socket). Returns once the
        launcher reported its pid."""
        uid, lock_fd = self._uids.acquire() if self._uids is not None else (None, -1)
        slot = Slot(
            uid=uid,
            lock_fd=lock_fd,
            cgroup=CallCgroup(
                call_cgroup_name(),
                memory_bytes=int(call.limits.memory_mb * MiB * CGROUP_MEMORY_SLACK),
                max_processes=call.limits.max_processes + CGROUP_EXTRA_PROCESSES,
                layers=layers,
                v2_base=self._cgroup2,
            ),
            # A root host, or one with user namespaces, gives the child a tmpfs
            # scratch in its own minimal root.
            scratch=None
            if uid is not None or layers["user_namespace"]
            else tempfile.mkdtemp(prefix="plughost-call-", dir=self._scratch_root),
            pid_namespace=layers["pid_namespace"],
        )
        try:
            if uid is not None and uid not in self._swept:
                self._kill(CallProcesses(0, uid))  # leftovers of a host that died
                self._swept.add(uid)
            pipes = {
                name: os.pipe2(os.O_CLOEXEC) for name in ("status", "reply", "stdout", "stderr")
            }
            slot.opened.extend(fd for pair in pipes.values() for fd in pair)
            if warm:
                slot.go, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                payload_fd = theirs.detach()
            else:
                payload_fd = self._payload_file(call)
            slot.opened.append(payload_fd)
            token = uuid.uuid4().hex  # the launcher's name for this child
            spec = {
                "plugin_dir": call.plugin_dir,
                "entrypoint": call.entrypoint,
                "limits": call.limits.__dict__,
                "scratch": slot.scratch,
                "uid": uid,
                "gid": uid,
                "import_paths": list(call.import_paths),
                "import_root": call.import_root,
                "expose": _exposed_paths(call.plugin_dir, call.import_paths),
                "hide": HIDDEN_SITE_DIRS,
                "layers": layers,
                "cgroup_procs": slot.cgroup.create(),
                "warm": warm,
                "token": token,
            }
            self.launcher.start_child(
                spec, {**{name: pair[1] for name, pair in pipes.items()}, "payload": payload_fd}
            )
            for _, write_end in pipes.values():
                os.close(write_end)
                slot.opened.remove(write_end)
            os.close(payload_fd)
            slot.opened.remove(payload_fd)
            slot.read_ends = {name: pair[0] for name, pair in pipes.items()}
            deadline = time.monotonic() + call.limits.timeout_s + 5
            pid = _read_pid(slot.read_ends["status"], deadline)
            slot.procs = CallProcesses(pid, uid, token=token)
        except BaseException:
            self._release(slot, None)
            raise
        return slot

    def _release(self, slot: Slot, watch: _Watch | None) -> None:
        """Kill what is left of a slot's call and give back its uid, cgroup and descriptors."""
        procs = slot.procs
        if procs is None and slot.uid is not None:
            procs = CallProcesses(0, slot.uid)
        # A PID namespace whose init has been reaped is empty: the kernel
        # killed and reaped everything in it before init could exit.
        emptied = watch is not None and watch.exit_status is not None and slot.pid_namespace
        if procs is not None and not emptied:
            self._kill(procs)
        slot.cgroup.remove()
        if slot.go is not None:
            slot.go.close()
        for fd in slot.opened:
            os.close(fd)
        slot.opened.clear()
        if slot.scratch is not None:
            shutil.rmtree(slot.scratch, ignore_errors=True)
        if slot.uid is not None:
            UidPool.release(slot.lock_fd)

    # -- prewarmed children (sandbox/prewarm.py) -----------------------------

    @property
    def warm_hits(self) -> int:
        """Calls that got a prewarmed child."""
        return self.warm.hits

    def warm_count(self) -> int:
        """Children set up and waiting in the pool now."""
        return self.warm.count()

    def warm_uids(self) -> set[int]:
        """Uids of the children waiting in the pool (not leftovers of a call)."""
        return self.warm.uids()

    def host_paths(self) -> list[Path]:
        """Directories the host writes in for every call: the call cgroups'
        parents and the uid and host lock directories (a server that gives
        up root hands them to its user)."""
        layers = self.layers()
        paths = [Path(LOCK_DIR), Path(HOSTS_DIR)]
        if self._cgroup2 is not None:
            return [*paths, self._cgroup2]
        roots = {"cgroup_memory": "memory", "cgroup_pids": "pids"}
        return paths + [Path(CGROUP_V1[name]) / "plughost" for name in roots if layers.get(name)]

    def uids_at_rest(self) -> set[int]:
        """Per-call uids this host has used that no call holds now (empty on
        a host without them): processes under one were left by its calls."""
        self.layers()
        return self._uids.at_rest() if self._uids is not None else set()

    def warm_pids(self) -> set[int]:
        """Pids of the children waiting in the pool (not leftovers of a call)."""
        return self.warm.pids()

    def settle(self, timeout_s: float = 5.0) -> None:
        """Wait until no warm child is being started (for measurements)."""
        self.warm.settle(timeout_s)

    def close(self) -> None:
        """Kill the warm children and stop the launcher."""
        self.warm.close()
        self.launcher.stop()

    def _kill(self, procs: CallProcesses) -> None:
        """Kill every process of a call: its root (which may still be in its
        root-owned setup, out of reach of the kill by uid), atomically by uid,
        then a sweep to verify.

        The root is killed by the launcher, which reaps it and so knows
        whether its pid still names it: a kill by pid from here could land on
        an unrelated process once the launcher had reaped the call and the
        pid was reused (pid_max is 32768 on many machines).
        """
        if procs.token:
            self.launcher.kill_call(procs.token)
        if procs.uid is not None:
            self.launcher.kill_uid(procs.uid)
        procs.kill_all()

    @staticmethod
    def _payload_file(call: CallSpec) -> int:
        header = {
            "mime_type": call.mime_type,
            "options": call.options,
            "image_size": len(call.image),
        }
        fd = os.memfd_create("plughost-payload", os.MFD_CLOEXEC)
        try:
            os.write(fd, encode_frame(header))
            view = memoryview(call.image)
            while view:
                view = view[os.write(fd, view) :]
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _missing(layers: dict[str, bool]) -> list[str]:
    """Layers calls lack here; a root host's unused user namespace is not one."""
    return [
        name
        for name, on in layers.items()
        if not on and not (name == "user_namespace" and layers["privilege_drop"])
    ]


# The interpreter and its standard library. Not the host environment's
# packages: a plugin imports its own (CallSpec.import_paths).
INTERPRETER_PATHS = (sys.base_prefix,)


def _site_dirs() -> list[str]:
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
    found = {os.path.realpath(p) for p in candidates if os.path.isdir(p)}
    return sorted(found)


HIDDEN_SITE_DIRS = _site_dirs()


def _exposed_paths(plugin_dir: str, import_paths: tuple[str, ...] = ()) -> list[str]:
    """What the child may read: INTERPRETER_PATHS, the plugin and its
    environment. Never the rest of the host's `sys.path` (its working
    directory, the host's own source, the host's packages)."""
    return [*INTERPRETER_PATHS, plugin_dir, *import_paths]


def _read_pid(status_fd: int, deadline: float) -> int:
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(status_fd, selectors.EVENT_READ)
        while len(buffer) < PID.size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise RuntimeError("launcher did not report the child's pid in time")
            chunk = os.read(status_fd, PID.size - len(buffer))
            if not chunk:
                raise RuntimeError("launcher closed the status pipe before reporting a pid")
            buffer += chunk
    (pid,) = PID.unpack(buffer)
    return int(pid)


class _Watch:
    """State of one call while the host waits for its verdict."""

    def __init__(
        self,
        call: CallSpec,
        fds: dict[str, int],
        procs: CallProcesses,
        started: float,
        kill: Callable[[CallProcesses], None],
        token: CancelToken | None = None,
        cgroup: CallCgroup | None = None,
    ) -> None:
        self.token = token
        self.cgroup = cgroup
        self.call = call
        self.fds = fds
        self.procs = procs
        self.started = started
        self._kill = kill
        self.deadline = started + call.limits.timeout_s
        self.reply = FrameReader(max_body=call.limits.max_output_bytes + 64 * 1024)
        self.status = bytearray()
        self.exit_status: int | None = None
        self.maxrss_kb = 0
        self.peak_rss = 0
        self.streams = {name: _Stream(fds[name]) for name in ("stdout", "stderr")}
        self.final: bytes | None = None
        self.exit_by = float("inf")
        self.ready = False

    def _stop_call(self) -> None:
        self._kill(self.procs)

    def elapsed_ms(self) -> float:
        return round((time.monotonic() - self.started) * 1000, 3)

    def until_verdict(self) -> Outcome:
        try:
            self._loop()
            outcome = self._judge()
        except _Verdict as verdict:
            self._stop_call()
            outcome = verdict.outcome
            self._collect_exit(time.monotonic() + 2.0)
        outcome.details.setdefault("elapsed_ms", self.elapsed_ms())
        # The cgroup's own maximum counts the page cache too; the samples do not.
        peak_mb = max(self.peak_rss, self.maxrss_kb * 1024) / MiB
        outcome.details.setdefault("peak_rss_mb", round(peak_mb, 1))
        cgroup_peak = self.cgroup.peak_bytes() if self.cgroup is not None else None
        if cgroup_peak is not None:  # page cache included, as the kernel counts it
            outcome.details.setdefault("cgroup_peak_mb", round(cgroup_peak / MiB, 1))
        for name, stream in self.streams.items():
            if stream.total:
                outcome.details.setdefault(f"{name}_tail", stream.text())
        return outcome

    # -- the wait loop -------------------------------------------------------

    def _loop(self) -> None:
        limits = self.call.limits
        with selectors.DefaultSelector() as selector:
            for name in ("status", "reply", "stdout", "stderr"):
                selector.register(self.fds[name], selectors.EVENT_READ, name)
            if self.token is not None:
                selector.register(self.token.fileno(), selectors.EVENT_READ, "cancel")
            next_sample = time.monotonic()
            while self.exit_status is None:
                now = time.monotonic()
                if self.final is not None and now >= self.exit_by:
                    # Replied but lingers (a thread holding it up): end it, keep the reply.
                    self._stop_call()
                    self._collect_exit(time.monotonic() + 2.0)
                    if self.exit_status is None:
                        raise _stopped("crashed", "sandbox child could not be reaped")
                    break
                if now >= self.deadline:
                    raise _stopped(
                        "timeout",
                        f"plugin did not finish within {limits.timeout_s:g} s",
                        limit_s=limits.timeout_s,
                    )
                if now >= next_sample:
                    self._sample_memory()
                    next_sample = now + WATCHDOG_INTERVAL_S
                wait = max(0.0, min(self.deadline, self.exit_by, next_sample) - now)
                for key, _ in selector.select(wait):
                    if not self._on_readable(key.data, key.fd):
                        selector.unregister(key.fd)
                if self.final is not None and self.exit_by == float("inf"):
                    # The reply is in: the child only has to exit.
                    self.exit_by = time.monotonic() + EXIT_GRACE_S
            # The child is gone; pick up what it wrote just before it exited.
            self._drain_after_exit()

    def _on_readable(self, name: str, fd: int) -> bool:
        if name == "cancel":
            raise _stopped("cancelled", "call was cancelled")
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not data:
            if name == "status" and self.exit_status is None:
                # Only the launcher writes there: it died, and the child with it.
                raise HostFailure(
                    "the sandbox launcher exited during the call; "
                    "it is started again for the next one",
                    {"stage": "launcher"},
                )
            return False
        if name == "status":
            self.status += data
            if len(self.status) >= EXIT.size:
                status, maxrss = EXIT.unpack(self.status[: EXIT.size])
                self.exit_status, self.maxrss_kb = status, maxrss
        elif name == "reply":
            self._on_reply(data)
        else:
            stream = self.streams[name]
            stream.add(data)
            total = sum(s.total for s in self.streams.values())
            if total > self.call.limits.max_stream_bytes:
                raise _stopped(
                    "output_too_large",
                    f"plugin printed more than {self.call.limits.max_stream_bytes} bytes",
                    stream=name,
                    limit_bytes=self.call.limits.max_stream_bytes,
                )
        return True

    def _on_reply(self, data: bytes) -> None:
        if self.final is not None:
            raise _stopped("protocol_violation", "bytes after the final frame")
        try:
            self.reply.feed(data)
            while self.reply.frames:
                frame = self.reply.frames.pop(0)
                if not self.ready:
                    parse_ready(frame)
                    self.ready = True
                elif self.final is None:
                    self.final = frame
                else:
                    raise ProtocolError("more than one final frame")
        except ProtocolError as exc:
            raise _stopped("protocol_violation", str(exc)) from exc

    def _sample_memory(self) -> None:
        # The cgroup counts each page once (RSS sums count pages shared after
        # fork in every process) and includes the tmpfs the call wrote.
        rss = self.cgroup.usage_bytes() if self.cgroup is not None else None
        if rss is None:
            rss = self.procs.total_rss()
        elif self.cgroup is not None and self.cgroup.oom_killed():
            raise _stopped(
                "memory_limit",
                "the kernel killed a process of the plugin at its memory cgroup limit",
                limit_mb=self.call.limits.memory_mb,
                enforced_by="cgroup",
            )
        self.peak_rss = max(self.peak_rss, rss)
        limit = self.call.limits.memory_mb * MiB
        if rss > limit:
            raise _stopped(
                "memory_limit",
                f"plugin used {rss / MiB:.0f} MB, the limit is {self.call.limits.memory_mb} MB",
                limit_mb=self.call.limits.memory_mb,
                peak_rss_mb=round(rss / MiB, 1),
            )

    def _drain_after_exit(self) -> None:
        for name in ("reply", "stdout", "stderr"):
            fd = self.fds[name]
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

    def _collect_exit(self, deadline: float) -> None:
        fd = self.fds["status"]
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while self.exit_status is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    return
                try:
                    if not self._on_readable("status", fd):
                        return
                except HostFailure:
                    return  # the launcher is gone: no status will come

    # -- the verdict ---------------------------------------------------------

    def _judge(self) -> Outcome:
        assert self.exit_status is not None
        exit_info = describe_exit(self.exit_status)
        if not self.ready:
            if exit_info.get("exit_code") == SETUP_FAILED:
                raise HostFailure(
                    "the sandbox could not apply its limits; the plugin was not run",
                    {"stage": "sandbox_setup", "stderr_tail": self.streams["stderr"].text()},
                )
            if self.cgroup is not None and self.cgroup.oom_killed():
                return self._crashed(exit_info)
            raise _stopped("crashed", "sandbox child died before it was ready", **exit_info)
        if self.reply.pending:
            raise _stopped("protocol_violation", "truncated frame on the reply pipe", **exit_info)
        if self.final is None:
            return self._crashed(exit_info)
        try:
            reply = parse_reply(self.final)
        except ProtocolError as exc:
            raise _stopped("protocol_violation", str(exc)) from exc
        if isinstance(reply, ErrorMessage):
            return Outcome(
                Status.SANDBOX_STOPPED if reply.reason == "memory_limit" else Status.PLUGIN_FAILED,
                reason=reply.reason,
                message=reply.message.splitlines()[0][:500] if reply.message else reply.exc_type,
                details={"exception": reply.exc_type[:200]}
                | (
                    {"limit_mb": self.call.limits.memory_mb}
                    if reply.reason == "memory_limit"
                    else {}
                ),
                traceback=reply.traceback,
            )
        if len(self.final) > self.call.limits.max_output_bytes:
            return Outcome(
                Status.PLUGIN_FAILED,
                reason="output_too_large",
                message=f"result of {len(self.final)} bytes, the limit is "
                f"{self.call.limits.max_output_bytes}",
                details={"limit_bytes": self.call.limits.max_output_bytes},
            )
        return Outcome(Status.SUCCESS, result=reply.result)

    def _crashed(self, exit_info: dict[str, Any]) -> Outcome:
        signal_name = exit_info.get("signal")
        # Whichever process of the call the kernel picked (the plugin, its init,
        # its relay), a kill at the memory cgroup means the memory limit.
        if self.cgroup is not None and self.cgroup.oom_killed():
            limit = self.call.limits.memory_mb
            return Outcome(
                Status.SANDBOX_STOPPED,
                reason="memory_limit",
                message=f"plugin exceeded its {limit} MB memory cgroup",
                details={"limit_mb": limit, "enforced_by": "cgroup", **exit_info},
            )
        if signal_name == signal.SIGXCPU.name:
            return Outcome(
                Status.SANDBOX_STOPPED,
                reason="timeout",
                message="plugin used up its CPU time",
                details={"limit_s": self.call.limits.timeout_s, **exit_info},
            )
        if signal_name == signal.SIGXFSZ.name:
            detail = "plugin exceeded the file size limit"
        elif signal_name:
            detail = f"plugin process was killed by {signal_name}"
        else:
            detail = f"plugin process exited with code {exit_info['exit_code']} without a reply"
        return Outcome(Status.SANDBOX_STOPPED, reason="crashed", message=detail, details=exit_info)


__all__ = ["OPTIONAL_LAYERS", "CallSpec", "Sandbox"]
