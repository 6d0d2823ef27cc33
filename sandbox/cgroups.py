"""One cgroup per call, a stronger alternative to rlimits: the memory limit
covers the whole process tree and the tmpfs pages it writes, and the pids
limit holds for root as well. Created before the call, removed after it,
by the host (the child only joins it: `sandbox.layers.cgroup`).

    cgroup v1 (memory and pids hierarchies, as this machine offers):
        memory.limit_in_bytes (+ memsw), pids.max; memory.oom_control
    cgroup v2 (one directory, `sandbox.cgroup2` says where):
        memory.max, memory.swap.max = 0, pids.max; memory.events oom_kill,
        memory.peak

Cgroups are named `call-<host id>-<call id>`; a host that is killed leaves
its calls' (empty) cgroups behind, and the next host to start removes them
(`sweep_stale`) once the dead host's lock shows it is gone.

On cgroup v1, a root host keeps the cgroups of each per-call uid from one of
its calls to the next (`CgroupPool`), as it keeps the uid's slot: they are
made for the uid's first call and named `call-<host id>-<pool>u<uid>`. A
call gets them only once every process of the uid's previous call has left
them (the uid's lock says as much; the pool checks `cgroup.procs` again),
with its own limits written, its peak (`memory.max_usage_in_bytes`) reset
and the OOM-kill count it will be judged by taken as it found it. On
cgroup v2 each call still gets cgroups of its own: `memory.peak` can be
reset only on Linux 6.12 and later, and a call's peak must be its own.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from sandbox.layers import CGROUP_V1

# Each host holds an exclusive flock on HOSTS_DIR/<host id>.lock for as long
# as it runs, and names its call cgroups `call-<host id>-<call id>`. A lock
# holds across PID namespaces and dies with its holder, so a host's sweep
# tells a live host from a dead one where a pid cannot: a pid means nothing
# in another PID namespace, and a dead host's pid may be reused. Hosts that
# share cgroups must share this directory (as they share the uid locks):
# root hosts share /run/plughost/hosts; an unprivileged host's cgroups are in
# a cgroup delegated to its user, so its lock is in that user's runtime
# directory (`hosts_dir`).
HOSTS_DIR = "/run/plughost/hosts"
# "h" first: never a number, so no tool reads the id as a pid.
HOST_ID = re.compile(r"^h[0-9a-f]{12}$")

_host_lock = threading.Lock()
_host: tuple[int, str, int] | None = None  # (pid, host id, lock fd)


def hosts_dir(euid: int | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """Where this host keeps its lock: HOSTS_DIR for root; for another user,
    `plughost/hosts` in its runtime directory ($XDG_RUNTIME_DIR, which only
    that user may write); None where it has none (a system service: /run is
    read-only under ProtectSystem=strict, and its delegated cgroup is its
    own, with no other host to tell it from)."""
    if (os.geteuid() if euid is None else euid) == 0:
        return HOSTS_DIR
    runtime = (os.environ if environ is None else environ).get("XDG_RUNTIME_DIR", "")
    return f"{runtime}/plughost/hosts" if runtime.startswith("/") else None


def host_id() -> str:
    """This host's id, taking its lock in `hosts_dir()` on first use.

    The lock is held until the process exits. A host that has no hosts
    directory, or cannot write it, gets an id without a lock: a sweep then
    takes it for gone, which only matters to another host sweeping the same
    cgroups, and a host of that kind shares its cgroups with none.
    """
    global _host
    with _host_lock:
        if _host is None or _host[0] != os.getpid():  # a forked child is a host of its own
            ident = "h" + uuid.uuid4().hex[:12]
            fd = -1
            directory = hosts_dir()
            if directory is not None:
                with contextlib.suppress(OSError):  # not writable (read-only /run, not root)
                    os.makedirs(directory, mode=0o700, exist_ok=True)
                    # Locked before it gets its name: a sweep never sees it unlocked.
                    staged = f"{directory}/{ident}.new"
                    fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.rename(staged, f"{directory}/{ident}.lock")
                    atexit.register(_release_host, os.getpid(), f"{directory}/{ident}.lock", fd)
            _host = (os.getpid(), ident, fd)
        return _host[1]


def _release_host(pid: int, lock: str, fd: int) -> None:
    """At a normal exit: remove this host's lock file, then let the lock go."""
    if os.getpid() == pid:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        with contextlib.suppress(OSError):
            os.close(fd)


def call_cgroup_name() -> str:
    """A fresh name for one call's cgroups, carrying this host's id."""
    return f"call-{host_id()}-{uuid.uuid4().hex[:12]}"


def _field(text: bytes, key: bytes) -> int:
    """The value of the line `key value` in a cgroup file, 0 if absent."""
    start = text.find(key + b" ")
    while start > 0 and text[start - 1 : start] != b"\n":
        start = text.find(key + b" ", start + 1)
    if start < 0:
        return 0
    end = text.find(b"\n", start)
    return int(text[start + len(key) + 1 : end if end >= 0 else len(text)])


def _write(path: Path, value: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def _lock_of_dead_host(ident: str) -> int | None:
    """Take the lock of host `ident` if that host is gone; return its fd
    (-1: no lock file, the host is gone too), or None while the host runs."""
    directory = hosts_dir()
    if directory is None:
        return -1  # no host of this kind keeps a lock: not one of ours runs
    try:
        fd = os.open(f"{directory}/{ident}.lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1  # a host makes its lock file before its first cgroup
    except PermissionError:
        return None  # another user's host: not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _call_roots(layers: dict[str, bool], v2_base: Path | None) -> list[Path]:
    if v2_base is not None:
        return [v2_base] if layers.get("cgroup_memory") or layers.get("cgroup_pids") else []
    return [Path(root) / "plughost" for name, root in CGROUP_V1.items() if layers.get(name)]


def sweep_stale(layers: dict[str, bool], v2_base: Path | None = None) -> int:
    """Remove the call cgroups of hosts that no longer run; return how many.

    A host killed outright cannot remove its calls' cgroups; their processes
    died with its launcher, so the directories are empty and can go. A host
    is gone when its lock in `hosts_dir()` can be taken (or it keeps none); this host's own cgroups
    and those of every host holding its lock are left alone. A cgroup that
    still has processes is not removed (rmdir refuses); a later sweep retries.
    """
    own = host_id()
    verdicts: dict[str, int | None] = {}  # host id -> its lock fd if gone, None if alive
    removed = 0
    try:
        for parent in _call_roots(layers, v2_base):
            for path in parent.glob("call-*"):
                ident = path.name.split("-")[1] if path.name.count("-") >= 2 else ""
                if ident == own or not HOST_ID.match(ident):
                    continue  # ours, or named by an earlier version (call-<pid>-...)
                if ident not in verdicts:
                    verdicts[ident] = _lock_of_dead_host(ident)
                if verdicts[ident] is None:
                    continue  # that host still runs: its cgroups are its own business
                with contextlib.suppress(OSError):
                    path.rmdir()
                    removed += 1
        # Lock files of dead hosts that left no cgroup (killed between calls);
        # a host without cgroups leaves them to one that has.
        roots = _call_roots(layers, v2_base)
        directory = hosts_dir()
        for lock in Path(directory).glob("h*.lock") if roots and directory else ():
            ident = lock.name.removesuffix(".lock")
            if ident != own and HOST_ID.match(ident) and ident not in verdicts:
                verdicts[ident] = _lock_of_dead_host(ident)
    finally:
        for ident, fd in verdicts.items():
            if fd is not None and fd >= 0:
                # Unlinked while held: no other sweep can mistake a new holder for it.
                with contextlib.suppress(OSError):
                    os.unlink(f"{hosts_dir()}/{ident}.lock")
                os.close(fd)
    return removed


class CallCgroup:
    """The cgroups of one call, named after it."""

    def __init__(
        self,
        name: str,
        memory_bytes: int,
        max_processes: int,
        layers: dict[str, bool],
        v2_base: Path | None = None,
    ) -> None:
        self.dirs: dict[str, Path] = {}
        self.v2 = v2_base is not None
        self.memory = bool(layers.get("cgroup_memory"))
        self.pids = bool(layers.get("cgroup_pids"))
        if v2_base is not None:
            if self.memory or self.pids:
                self.dirs["unified"] = v2_base / name
        else:
            if self.memory:
                self.dirs["memory"] = Path(CGROUP_V1["cgroup_memory"]) / "plughost" / name
            if self.pids:
                self.dirs["pids"] = Path(CGROUP_V1["cgroup_pids"]) / "plughost" / name
        self.memory_bytes = memory_bytes
        self.max_processes = max_processes
        self.procs_files: list[str] = []
        # The memory controller's OOM kills before this call: a kept cgroup's
        # count goes on from its earlier calls.
        self.oom_seen = 0
        self.uid: int | None = None  # the per-call uid a CgroupPool keeps it for

    def create(self) -> list[str]:
        """Create the cgroups; return the `cgroup.procs` files the child joins.

        Raises OSError if a controller refuses (the call then does not run).
        """
        for kind, path in self.dirs.items():
            path.parent.mkdir(exist_ok=True)
            path.mkdir(exist_ok=True)
            if kind == "unified":
                if self.memory:
                    (path / "memory.max").write_text(str(self.memory_bytes))
                    if (path / "memory.swap.max").exists():  # absent without swap accounting
                        (path / "memory.swap.max").write_text("0")
                if self.pids:
                    (path / "pids.max").write_text(str(self.max_processes))
            elif kind == "memory":
                (path / "memory.limit_in_bytes").write_text(str(self.memory_bytes))
                swap = path / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    swap.write_text(str(self.memory_bytes))
            else:
                (path / "pids.max").write_text(str(self.max_processes))
        # Made with exist_ok: a directory of the same name may have been left
        # with kills counted already.
        self.oom_seen = self.oom_count()
        return [str(path / "cgroup.procs") for path in self.dirs.values()]

    def set_limits(self, memory_bytes: int, max_processes: int) -> None:
        """Give a kept v1 cgroup the limits of its next call (written only
        where they change). Raises OSError if the kernel refuses one (a
        memory limit below what the cgroup still holds)."""
        memory = self.dirs.get("memory")
        if memory is not None and memory_bytes != self.memory_bytes:
            files = [memory / "memory.limit_in_bytes"]
            swap = memory / "memory.memsw.limit_in_bytes"
            if swap.exists():
                # memsw may never be below the memory limit: raise it first, lower it last.
                files = [swap, *files] if memory_bytes > self.memory_bytes else [*files, swap]
            for path in files:
                _write(path, memory_bytes)
        self.memory_bytes = memory_bytes
        pids = self.dirs.get("pids")
        if pids is not None and max_processes != self.max_processes:
            _write(pids / "pids.max", max_processes)
        self.max_processes = max_processes

    def _read_memory(self, name: str) -> bytes | None:
        """The memory controller's file `name`, None without a memory cgroup."""
        path = self._memory_dir()
        if path is None:
            return None
        fd = os.open(f"{path}/{name}", os.O_RDONLY | os.O_CLOEXEC)  # no Path made per read
        try:
            return os.read(fd, 65536)
        finally:
            os.close(fd)

    def empty(self) -> bool:
        """Whether no process is left in any of the cgroups."""
        return all(_members(path) == [] for path in self.dirs.values())

    @classmethod
    def made_for_call(
        cls,
        memory_bytes: int,
        max_processes: int,
        layers: dict[str, bool],
        v2_base: Path | None = None,
        name: str | None = None,
    ) -> CallCgroup:
        """A new call's cgroups, named after this host (or `name`) and made
        with their limits (`procs_files` lists what the child joins). Raises
        OSError if a controller refuses, after removing what was made."""
        made = cls(name or call_cgroup_name(), memory_bytes, max_processes, layers, v2_base)
        try:
            made.procs_files = made.create()
        except OSError:
            made.remove()
            raise
        return made

    def sample(self) -> tuple[int | None, bool]:
        """The call's memory now (`usage_bytes`) and whether the kernel has
        OOM-killed one of its processes (`oom_killed`), in one step."""
        usage = self.usage_bytes()
        return usage, usage is not None and self.oom_killed()

    def at_end(self) -> tuple[bool, int | None]:
        """Once the call is over: `oom_killed` and `peak_bytes`, in one step."""
        return self.oom_killed(), self.peak_bytes()

    @property
    def counts_memory(self) -> bool:
        """Whether a memory controller counts (and limits) the call's pages."""
        return self._memory_dir() is not None

    def _memory_dir(self) -> Path | None:
        return self.dirs.get("unified") if self.v2 and self.memory else self.dirs.get("memory")

    def oom_count(self) -> int:
        """The memory controller's OOM kills in this cgroup since it was made."""
        try:
            events = self._read_memory("memory.events" if self.v2 else "memory.oom_control")
            return _field(events, b"oom_kill") if events is not None else 0
        except (OSError, ValueError):
            return 0

    def oom_killed(self) -> bool:
        """True if the kernel killed a process of this call for the memory limit."""
        return self.oom_count() > self.oom_seen

    def usage_bytes(self) -> int | None:
        """Anonymous and tmpfs memory of the whole call now, None without a memory cgroup."""
        anon, shmem = (b"anon", b"shmem") if self.v2 else (b"total_rss", b"total_shmem")
        try:
            stat = self._read_memory("memory.stat")
            return None if stat is None else _field(stat, anon) + _field(stat, shmem)
        except (OSError, ValueError):
            return None

    def peak_bytes(self) -> int | None:
        """The call's highest memory use, page cache included, as the kernel
        kept it (v1 memory.max_usage_in_bytes, v2 memory.peak from Linux
        5.19); None where it is not kept."""
        try:
            peak = self._read_memory("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
            return None if peak is None else int(peak)
        except (OSError, ValueError):
            return None

    def peak_reset(self) -> bool:
        """Start a kept v1 cgroup's peak again from its (empty) usage, so
        that the next call's peak is its own; False if the kernel refused."""
        memory = self.dirs.get("memory")
        if memory is None:
            return True
        try:
            _write(memory / "memory.max_usage_in_bytes", 0)
        except OSError:
            return False
        return True

    def remove(self, deadline_s: float = 2.0) -> bool:
        """Remove the cgroups once their processes are gone (they are killed
        first); False if one is still there at the deadline (a process of the
        call not yet reaped: the caller retries later)."""
        end = time.monotonic() + deadline_s
        for path in self.dirs.values():
            while path.exists():
                try:
                    path.rmdir()
                except OSError:
                    if time.monotonic() > end:
                        break
                    _kill_members(path)
                    time.sleep(0.005)
        return not any(path.exists() for path in self.dirs.values())

    def emptied(self, deadline_s: float = 2.0) -> bool:
        """Wait until no process is left in the cgroups, killing what lingers;
        False if one is still there at the deadline."""
        end = time.monotonic() + deadline_s
        while not self.empty():
            if time.monotonic() > end:
                return False
            for path in self.dirs.values():
                _kill_members(path)
            time.sleep(0.005)
        return True


def _members(path: Path) -> list[int] | None:
    """The pids in the cgroup at `path`, None if they cannot be read. The
    file is opened anew each time: v1 keeps the pid list of an open one."""
    try:
        fd = os.open(f"{path}/cgroup.procs", os.O_RDONLY | os.O_CLOEXEC)
        try:
            listed = b"".join(iter(lambda: os.read(fd, 65536), b""))
        finally:
            os.close(fd)
        return [int(pid) for pid in listed.split()]
    except (OSError, ValueError):
        return None


def _kill_members(path: Path) -> None:
    """SIGKILL the processes in the cgroup at `path` (still exiting, or left)."""
    for pid in _members(path) or []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class CgroupPool:
    """The call cgroups of a host: on cgroup v1, those of each per-call uid
    are made for its first call and kept for its next ones; otherwise (cgroup
    v2, or a call without a uid of its own) each call gets new ones.

    Between two calls of a uid, a kept cgroup holds no process (`give_back`
    checks, and removes a cgroup that still holds one); its OOM-kill count is
    carried over, so a call is judged by the kills in its own time. What a
    call's processes charged to it and did not free (page cache) stays
    charged, as it would to the parent of a removed cgroup, and the kernel
    reclaims it before it counts against the next call's limit.
    """

    def __init__(self, layers: dict[str, bool], v2_base: Path | None) -> None:
        self.layers = layers
        self.v2_base = v2_base
        self._tag = uuid.uuid4().hex[:6]  # two pools of one host never share a cgroup
        self._kept: dict[int, CallCgroup] = {}
        # Given back but not yet removable (a process of the call still
        # exiting on a slow machine): removed by a later take, give_back or close.
        self._leftover: list[CallCgroup] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self, uid: int | None, memory_bytes: int, max_processes: int) -> CallCgroup:
        """The cgroups of a call of `uid` with these limits (`procs_files`
        lists what its child joins). Raises OSError if a controller refuses."""
        if self._leftover:
            self._remove_leftovers()
        if uid is None or self.v2_base is not None:
            return CallCgroup.made_for_call(memory_bytes, max_processes, self.layers, self.v2_base)
        with self._lock:
            kept = self._kept.pop(uid, None)
        if kept is not None:
            try:
                kept.set_limits(memory_bytes, max_processes)
                return kept
            except OSError:
                kept.remove()
        made = CallCgroup.made_for_call(
            memory_bytes, max_processes, self.layers, None, f"call-{host_id()}-{self._tag}u{uid}"
        )
        made.uid = uid
        return made

    def give_back(self, cgroup: CallCgroup) -> None:
        """The call of `cgroup` is over and its processes killed: keep its
        cgroups for the uid's next call once they are empty, else remove them."""
        uid = cgroup.uid
        if uid is None or not cgroup.emptied() or not cgroup.peak_reset():
            self._remove(cgroup)
            return
        cgroup.oom_seen = cgroup.oom_count()
        with self._lock:
            if not self._closed:
                self._kept[uid] = cgroup
                return
        self._remove(cgroup)

    def _remove(self, cgroup: CallCgroup) -> None:
        if not cgroup.remove():
            with self._lock:
                self._leftover.append(cgroup)

    def _remove_leftovers(self) -> None:
        """One more try (one rmdir each, no wait) at the cgroups not yet removed."""
        with self._lock:
            waiting, self._leftover = self._leftover, []
        for cgroup in waiting:
            if not cgroup.remove(deadline_s=0.0):
                with self._lock:
                    self._leftover.append(cgroup)

    def leftovers(self) -> list[CallCgroup]:
        """Cgroups of ended calls still waiting to be removed."""
        with self._lock:
            return list(self._leftover)

    def kept(self) -> list[CallCgroup]:
        """The cgroups kept for the uids' next calls now."""
        with self._lock:
            return list(self._kept.values())

    def close(self) -> None:
        """Remove every kept cgroup; later ones are removed when given back."""
        with self._lock:
            self._closed = True
            kept, self._kept = list(self._kept.values()), {}
            kept += self._leftover
            self._leftover = []
        for cgroup in kept:
            cgroup.remove()
