"""Namespaces a root launcher makes for its calls, instead of each call's child.

Creating and destroying a namespace is the kernel's work, paid per call:
about 1.5 ms of machine CPU for a network namespace (its teardown runs in a
kernel workqueue), 0.35 ms for IPC; and a child that makes its own PID
namespace needs a relay process to stay outside it. A root launcher
therefore (`Shared`):

- makes one empty network namespace, one IPC and one UTS namespace when it
  starts, and a call joins them (`setns`) as the first thing after the fork
  when its layers make that safe (`Shared.given`);
- makes each call's own PID namespace itself: `unshare(CLONE_NEWPID)` before
  the fork and `setns` back to its own after it, so the child is the new
  namespace's init and no relay is needed.

What a call shares with the other calls of the same launcher, and why that
is safe (SECURITY.md, "Shared between calls"):

    net  an empty namespace: no interface but loopback, which stays down. A
         call can open no IP socket (seccomp refuses AF_INET and AF_INET6
         when the namespace is shared) and can reach no abstract unix socket
         bound outside its own Landlock domain (ABI 6 scope). So: shared only
         when the call has seccomp and Landlock with ABI 6 or later.
    ipc  System V IPC and POSIX message queues are per IPC namespace; the
         seccomp filter refuses every one of their system calls when the
         namespace is shared. So: shared only when the call has seccomp.
    uts  the host name: the same for every call, and no call holds the
         capability to change it.

Everything else stays per call: the PID namespace (made per call, above),
the mount namespace with its minimal root and scratch tmpfs, the uid, the
cgroup, the Landlock domain. A host that is not root (user namespaces) or a
call without those layers makes its namespaces in the child, as before.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from sandbox.layers import landlock
from sandbox.layers.ipc import CLONE_NEWIPC
from sandbox.layers.kernel import IsolationError, check, libc, unshare
from sandbox.layers.net import CLONE_NEWNET
from sandbox.layers.pid import CLONE_NEWPID
from sandbox.layers.uts import CLONE_NEWUTS

# The namespaces a launcher makes once: /proc/self/ns name, flag, the layer.
ONCE = (
    ("net", CLONE_NEWNET, "network_namespace"),
    ("ipc", CLONE_NEWIPC, "ipc_namespace"),
    ("uts", CLONE_NEWUTS, "uts_namespace"),
)
PID_LAYER = "pid_namespace"


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
        self.landlock_scopes = False
        if os.geteuid() != 0:
            return
        self.landlock_scopes = landlock.landlock_abi() >= landlock.SCOPE_ABI
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
        call's own uid on a root host): a subset of net, ipc, uts, pid."""
        if uid is None or self.own_pid < 0:
            return ()
        seccomp = layers.get("seccomp", False)
        safe = {
            "net": seccomp and layers.get("landlock", False) and self.landlock_scopes,
            "ipc": seccomp,
            "uts": True,
        }
        given = [
            name
            for name, _, layer in ONCE
            if name in self.fds and layers.get(layer, False) and safe[name]
        ]
        if layers.get(PID_LAYER, False):
            given.append("pid")
        return tuple(given)

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
        for fd in [*self.fds.values(), self.own_pid]:
            if fd >= 0:
                os.close(fd)
        self.fds, self.own_pid = {}, -1


def flags_of(given: tuple[str, ...]) -> int:
    """The CLONE_NEW* flags of the namespaces `given`: the child makes none of them."""
    flags = CLONE_NEWPID if "pid" in given else 0
    for name, flag, _ in ONCE:
        if name in given:
            flags |= flag
    return flags
