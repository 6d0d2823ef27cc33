"""Namespaces a root launcher makes for its calls, instead of each call's child.

Creating and destroying a namespace is the kernel's work, paid per call,
and a child that makes its own PID namespace needs a relay process to stay
outside it. A root launcher therefore (`Shared`):

- makes one IPC and one UTS namespace when it starts, and a call joins them
  (`setns`) as the first thing after the fork when its layers make that
  safe (`Shared.given`);
- makes each call's own PID namespace itself: `unshare(CLONE_NEWPID)` before
  the fork and `setns` back to its own after it, so the child is the new
  namespace's init and no relay is needed;
- builds each plugin's minimal root once, in a mount namespace of its own
  (`root_for`, `mnt.build_root_template`): a call joins it and takes a
  private copy (`mnt.enter_root_copy`), in which it mounts its own scratch
  tmpfs and /proc. The copy holds the same read-only mounts a call would
  have built; nothing in it is writable or shared but those read-only
  mounts, and a template is built again when one of its sources is no
  longer the same file.

What a call shares with the other calls of the same launcher, and why that
is safe (SECURITY.md, "Shared between calls"):

    ipc  System V IPC and POSIX message queues are per IPC namespace; the
         seccomp filter refuses every one of their system calls when the
         namespace is shared. So: shared only when the call has seccomp.
    uts  the host name: the same for every call, and no call holds the
         capability to change it.

The network namespace stays the call's own: in one shared between calls a
call would read the others' unix sockets, abstract names and socket paths,
in /proc/net/unix, and could tell an abstract name is taken by trying to
bind it; Landlock scopes only connecting and sending. Everything else stays
per call too: the PID namespace (made per call, above), the mount namespace
with its minimal root and scratch tmpfs, the uid, the cgroup, the Landlock
domain. A host that is not root (user namespaces) or a call without those
layers makes its namespaces in the child, as before.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator

from sandbox.layers import mnt
from sandbox.layers.ipc import CLONE_NEWIPC
from sandbox.layers.kernel import IsolationError, check, libc, unshare
from sandbox.layers.pid import CLONE_NEWPID
from sandbox.layers.uts import CLONE_NEWUTS
from sandbox.protocol import ChildSpec

# The namespaces a launcher makes once: /proc/self/ns name, flag, the layer.
ONCE = (
    ("ipc", CLONE_NEWIPC, "ipc_namespace"),
    ("uts", CLONE_NEWUTS, "uts_namespace"),
)
PID_LAYER = "pid_namespace"
MOUNT_LAYER = "mount_namespace"
MAX_ROOTS = 64  # minimal-root templates a launcher keeps (one per plugin and environment)


def _open_ns(name: str) -> int:
    return os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)


def setns(fd: int, flag: int) -> None:
    """Join the namespace `fd` refers to. Raises IsolationError."""
    check(libc.setns(fd, flag), f"setns({flag:#x})")


class Shared:
    """The namespaces of one launcher; empty on a host that is not root."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.own_pid = -1
        # (exposed paths, hidden paths) -> (template namespace, identity of its sources)
        self.roots: OrderedDict[tuple[object, ...], tuple[int, tuple[object, ...]]] = OrderedDict()
        if os.geteuid() != 0:
            return
        own_pid = _open_ns("pid")
        try:  # the launcher can make PID namespaces (not so in every container)
            unshare(CLONE_NEWPID)
            setns(own_pid, CLONE_NEWPID)
            self.own_pid = own_pid
        except IsolationError:
            os.close(own_pid)
            return
        own = {name: _open_ns(name) for name, _, _ in ONCE}
        try:
            flags = 0
            for _, flag, _ in ONCE:
                flags |= flag
            unshare(flags)
            self.fds = {name: _open_ns(name) for name, _, _ in ONCE}
        except (IsolationError, OSError):
            self.fds = {}
        finally:
            for name, flag, _ in ONCE:
                setns(own[name], flag)  # the launcher itself stays where it was
                os.close(own[name])

    def given(self, layers: dict[str, bool], uid: int | None) -> tuple[str, ...]:
        """The namespaces this launcher gives a call with `layers` (and the
        call's own uid on a root host): a subset of ipc, uts, pid."""
        if uid is None or self.own_pid < 0:
            return ()
        safe = {"ipc": layers.get("seccomp", False), "uts": True}
        given = [
            name
            for name, _, layer in ONCE
            if name in self.fds and layers.get(layer, False) and safe[name]
        ]
        if layers.get(PID_LAYER, False):
            given.append("pid")
        return tuple(given)

    def give(self, spec: ChildSpec) -> tuple[tuple[str, ...], int]:
        """The namespaces this launcher gives the call of `spec` (`given`),
        plus "mnt" and a template of its minimal root to copy (a descriptor
        of the launcher's; -1 when the child builds its own root)."""
        given = self.given(spec.layers, spec.uid)
        if "pid" not in given or not spec.layers.get(MOUNT_LAYER, False):
            return given, -1
        root = self.root_for(spec.expose, spec.hide)
        return ((*given, "mnt"), root) if root >= 0 else (given, -1)

    def root_for(self, needed: tuple[str, ...], hidden: tuple[str, ...]) -> int:
        """A mount namespace holding the minimal root for `needed`, made once
        and made again when one of its sources is no longer the file it was
        (a plugin directory replaced, a package upgrade's new loader cache)."""
        key = (needed, hidden)
        identity = _identity(needed)
        made = self.roots.pop(key, None)
        if made is not None:
            if made[1] == identity:
                self.roots[key] = made
                return made[0]
            os.close(made[0])
        fd = _make_root(needed, hidden)
        if fd >= 0:
            self.roots[key] = (fd, identity)
            while len(self.roots) > MAX_ROOTS:
                os.close(self.roots.popitem(last=False)[1][0])
        return fd

    @contextlib.contextmanager
    def pid_namespace_for_next_child(self, given: tuple[str, ...]) -> Iterator[None]:
        """Within the block, the next process forked is the init of a new PID
        namespace (when `given` holds "pid")."""
        if "pid" not in given:
            yield
            return
        unshare(CLONE_NEWPID)
        try:
            yield
        finally:
            setns(self.own_pid, CLONE_NEWPID)  # later forks are in ours again

    def join(self, given: tuple[str, ...]) -> None:
        """In the forked child: join the shared namespaces `given` names, then
        close every descriptor of them (the plugin never holds one)."""
        for name, flag, _ in ONCE:
            if name in given:
                setns(self.fds[name], flag)
        self.close()

    def close(self) -> None:
        for fd in [*self.fds.values(), self.own_pid, *(root for root, _ in self.roots.values())]:
            if fd >= 0:
                os.close(fd)
        self.fds, self.own_pid = {}, -1
        self.roots.clear()


def _identity(needed: Iterable[str]) -> tuple[object, ...]:
    """Which files the paths a minimal root binds are now: (device, inode)
    of each exposed path and of the system files bound one by one."""
    found: list[object] = []
    for path in (*needed, *mnt.SYSTEM_FILES):
        try:
            st = os.stat(path)
        except OSError:
            found.append(None)
            continue
        found.append((st.st_dev, st.st_ino))
    return tuple(found)


def _make_root(needed: tuple[str, ...], hidden: tuple[str, ...]) -> int:
    """Build a minimal-root template in a forked helper; return a descriptor
    of its mount namespace (-1 if it could not be built). The helper exits
    once the launcher holds the namespace."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            keep = {ready_w, hold_r}
            for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
                if fd > 2 and fd not in keep:
                    with contextlib.suppress(OSError):
                        os.close(fd)  # the launcher's: calls' pipes, its socket
            mnt.build_root_template(needed, hidden)
            os.write(ready_w, b"1")
            os.read(hold_r, 1)  # returns once the launcher has the namespace
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(hold_r)
    fd = -1
    try:
        if os.read(ready_r, 1) == b"1":
            fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(hold_w)
        os.waitpid(pid, 0)
    return fd


def flags_of(given: tuple[str, ...]) -> int:
    """The CLONE_NEW* flags of the namespaces `given`: the child makes none of
    them ("mnt", a copied root, is made by `mnt.enter_root_copy`)."""
    flags = CLONE_NEWPID if "pid" in given else 0
    for name, flag, _ in ONCE:
        if name in given:
            flags |= flag
    return flags
