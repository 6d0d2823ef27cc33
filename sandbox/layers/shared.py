"""Namespaces a root launcher makes for its calls, instead of each call's child.

Creating and destroying a namespace is the kernel's work, paid per call,
and a child that makes its own PID namespace needs a relay process to stay
outside it. A root launcher therefore (`Shared`):

- makes one IPC and one UTS namespace when it starts, and a call joins them
  (`setns`) as the first thing after the fork when its layers make that
  safe (`Shared.given`);
- keeps a PID and a network namespace for each uid it runs calls of (the
  uid's `Slot`), and forks a call of that uid into them: one call at a
  time, one after another, each finding them clean (the slot's holder
  kills what the last call left and checks that nothing is left);
- otherwise makes each call's own PID namespace itself: `unshare(CLONE_NEWPID)`
  before the fork and `setns` back to its own after it, so the child is the
  new namespace's init and no relay is needed;
- builds each plugin's minimal root once, in a mount namespace of its own
  (`root_for`, `mnt.build_root_template`): a call joins it and takes a
  private copy (`mnt.enter_root_copy`), in which it mounts its own scratch
  tmpfs and /proc. The copy holds the same read-only mounts a call would
  have built; nothing in it is writable or shared but those read-only
  mounts, and a template is built again when one of its sources is no
  longer the same file.

What a call shares with the other calls of the same launcher, and why that
is safe (SECURITY.md, "Shared between calls"):

    ipc   System V IPC and POSIX message queues are per IPC namespace; the
          seccomp filter refuses every one of their system calls when the
          namespace is shared. So: shared only when the call has seccomp.
    uts   the host name: the same for every call, and no call holds the
          capability to change it.
    slot  the PID and network namespaces of its uid, with the calls of that
          uid before and after it, never at the same time; the clean-up
          between two calls leaves no process, no socket and no PID count,
          and the seccomp filter keeps IP sockets (whose state could outlast
          them) out.

No network namespace is ever shared by two running calls: a call would read
the others' unix sockets, abstract names and socket paths, in
/proc/net/unix, and could tell an abstract name is taken by trying to bind
it; Landlock scopes only connecting and sending. Everything else stays per
call too: the mount namespace with its minimal root and scratch tmpfs, the
uid, the cgroup, the Landlock domain. A host that is not root (user
namespaces) or a call without those layers makes its namespaces in the
child, as before.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn

from sandbox.layers import mnt
from sandbox.layers.ipc import CLONE_NEWIPC
from sandbox.layers.kernel import (
    PR_SET_PDEATHSIG,
    IsolationError,
    failed,
    libc,
    prctl,
    set_command_line,
    unshare,
)
from sandbox.layers.net import CLONE_NEWNET
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
# A uid's slot is used only by a call that has all of these (`Slot`).
SLOT_LAYERS = (PID_LAYER, MOUNT_LAYER, "network_namespace", "seccomp")
MAX_ROOTS = 64  # minimal-root templates a launcher keeps (one per plugin and environment)
# Uids with namespaces kept; a call of any other uid makes its own. A slot's
# holder keeps about 1.6 MB of memory of its own (measured over 3,000 calls),
# and a host uses about as many uids as it runs calls at once, a few more
# while calls are put away.
MAX_SLOTS = 64
SLOT_START_S = 2.0  # for a new slot's holder to report its namespaces made
CLEAN_DEADLINE_S = 1.0  # for whatever a call left in its slot to be gone
HOLDER_TITLE = b"plughost-slot-holder"  # its command line, as ps shows it


def _open_ns(name: str) -> int:
    return os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)


def setns(fd: int, flag: int) -> None:
    """Join the namespace `fd` refers to. Raises IsolationError."""
    if libc.setns(fd, flag) != 0:
        failed(f"setns({flag:#x})")


class Shared:
    """The namespaces of one launcher; empty on a host that is not root."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.own_pid = -1
        # (exposed paths, hidden paths) -> (template namespace, identity of its sources)
        self.roots: OrderedDict[tuple[object, ...], tuple[int, tuple[object, ...]]] = OrderedDict()
        self.slots: dict[int, Slot] = {}  # uid -> its slot
        self.slots_work = True  # until a holder fails to start
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

    def give(self, spec: ChildSpec) -> tuple[tuple[str, ...], int, Slot | None]:
        """The namespaces this launcher gives the call of `spec` (`given`),
        plus "mnt" and a template of its minimal root to copy (a descriptor
        of the launcher's; -1 when the child builds its own root), and its
        uid's slot when the call has every layer of SLOT_LAYERS ("slot"
        then stands for "pid": the slot's PID and network namespaces)."""
        given = self.given(spec.layers, spec.uid)
        if "pid" not in given or not spec.layers.get(MOUNT_LAYER, False):
            return given, -1, None
        root = self.root_for(spec.expose, spec.hide)
        if root < 0:
            return given, -1, None
        slot = None
        if spec.uid and all(spec.layers.get(layer, False) for layer in SLOT_LAYERS):
            slot = self.slot_for(spec.uid)
        if slot is not None and not slot.busy:
            slot.busy = True  # until its holder has cleaned up after this call
            given = tuple("slot" if name == "pid" else name for name in given)
        else:
            slot = None
        return (*given, "mnt"), root, slot

    def slot_for(self, uid: int) -> Slot | None:
        """The slot of `uid`, made on its first call (None when MAX_SLOTS
        are kept, or a holder could not start here: a kernel without
        ns_last_pid, a read-only /proc/sys, no network namespaces; then no
        slot is tried again)."""
        slot = self.slots.get(uid)
        if slot is None and self.slots_work and len(self.slots) < MAX_SLOTS:
            slot = _make_slot(uid, self.own_pid)
            if slot is None:
                self.slots_work = False
            else:
                self.slots[uid] = slot
        return slot

    def retire(self, slot: Slot) -> None:
        """Forget `slot` and kill its holder, which ends every process left in
        its PID namespace (the holder is the launcher's child, to reap)."""
        if self.slots.get(slot.uid) is slot:
            del self.slots[slot.uid]
        with contextlib.suppress(ProcessLookupError):
            os.kill(slot.holder, signal.SIGKILL)
        slot.close()

    def holder_ended(self, pid: int) -> Slot | None:
        """The slot whose holder `pid` was reaped, forgotten (its namespaces
        ended with it); None if `pid` held no slot."""
        for uid, slot in self.slots.items():
            if slot.holder == pid:
                del self.slots[uid]
                return slot
        return None

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

    def pid_namespace_for_next_child(self, given: tuple[str, ...], slot: Slot | None) -> bool:
        """Until `own_pid_namespace_again`, the next process forked is the
        init of a new PID namespace (when `given` holds "pid"), or a process
        of `slot`'s. False when the launcher's own stays in place."""
        if slot is not None:
            setns(slot.pid_ns, CLONE_NEWPID)
        elif "pid" in given:
            unshare(CLONE_NEWPID)
        else:
            return False
        return True

    def own_pid_namespace_again(self) -> None:
        """Later forks are in the launcher's PID namespace again."""
        setns(self.own_pid, CLONE_NEWPID)

    def join(self, given: tuple[str, ...], slot: Slot | None) -> None:
        """In the forked child: join the shared namespaces `given` names and
        `slot`'s network namespace. Their descriptors are closed with every
        other the child was not handed, in its first step (the plugin never
        holds one)."""
        for name, flag, _ in ONCE:
            if name in given:
                setns(self.fds[name], flag)
        if slot is not None:
            setns(slot.net_ns, CLONE_NEWNET)

    def close(self) -> None:
        for fd in [*self.fds.values(), self.own_pid, *(root for root, _ in self.roots.values())]:
            if fd >= 0:
                os.close(fd)
        for slot in self.slots.values():
            slot.close()
        self.fds, self.own_pid = {}, -1
        self.roots.clear()
        self.slots.clear()


@dataclass
class Slot:
    """A uid's PID and network namespaces, kept for its calls one after another.

    A root launcher keeps them for each uid it has run a call of (up to
    MAX_SLOTS): a call of that uid is forked into the PID namespace (it is
    not its init) and joins the network namespace, so neither is made and
    torn down per call. The namespace's init is the slot's holder (`_hold`):
    a root process that runs no plugin code, reaps what the calls leave,
    and, between two calls, cleans the slot (`_clean`): it kills every
    process left in the namespace, checks that none is left and that the
    network namespace holds no socket, and resets the namespace's PID
    counter, so the next call finds the namespaces as they were made. A slot
    that cannot be cleaned is retired: its holder is killed, which ends the
    namespace, and the uid's next call makes a new one. Two calls never
    share a slot at once: a uid is held by one call from its start to the
    end of its clean-up (`sandbox.supervisor.UidPool`).

    What a call of a slot cannot do, so that the namespaces stay clean:
    open an IP socket (the seccomp filter's variant, `ip=False`), or see the
    holder (its /proc is mounted with hidepid=2, invisible).
    """

    uid: int  # the uid whose calls it takes
    holder: int  # pid of the namespaces' holder, the launcher's child
    pid_ns: int  # descriptors of its namespaces
    net_ns: int
    control: int  # the launcher writes one byte: clean the slot
    answer: int  # the holder answers b"1" (clean) or b"0" (not clean)
    # A call was forked into it and it has not been cleaned since. A call of
    # the uid that comes meanwhile (its host gave up on the last one without
    # waiting for its end) gets namespaces of its own.
    busy: bool = False

    def close(self) -> None:
        """Close its descriptors (once; a later call does nothing)."""
        for fd in (self.pid_ns, self.net_ns, self.control, self.answer):
            if fd >= 0:
                os.close(fd)
        self.pid_ns = self.net_ns = self.control = self.answer = -1


def _make_slot(uid: int, own_pid: int) -> Slot | None:
    """Fork a slot's holder as the init of a new PID namespace; it makes the
    network namespace. None if it did not report both made in time."""
    control_r, control_w = os.pipe2(os.O_CLOEXEC)
    answer_r, answer_w = os.pipe2(os.O_CLOEXEC)
    unshare(CLONE_NEWPID)
    try:
        pid = os.fork()
        if pid == 0:
            _hold(control_r, answer_w)
    finally:
        setns(own_pid, CLONE_NEWPID)
    os.close(control_r)
    os.close(answer_w)
    slot = Slot(uid, pid, -1, -1, control_w, answer_r)
    with contextlib.suppress(OSError):
        if _answer(answer_r, SLOT_START_S) == b"1":
            slot.pid_ns = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            slot.net_ns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            return slot
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    slot.close()
    return None


def _answer(fd: int, timeout_s: float) -> bytes:
    """One byte from a holder, or b"" when none came within `timeout_s`."""
    poller = select.poll()  # a busy launcher holds descriptors past select()'s 1024
    poller.register(fd, select.POLLIN)
    if not poller.poll(timeout_s * 1000):
        return b""
    return os.read(fd, 1)


def _hold(control: int, answer: int) -> NoReturn:
    """A slot's holder: init of the slot's PID namespace, in its own network
    namespace. Cleans the slot for each byte on `control`; exits when the
    launcher is gone (end of file there, or PR_SET_PDEATHSIG)."""
    code = 1
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.set_wakeup_fd(-1)  # the launcher's, closed below
        # The calls' orphans are re-parented here; the kernel reaps them at once.
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        close_all_but({control, answer})
        set_command_line(HOLDER_TITLE)
        unshare(CLONE_NEWNET)
        last_pid = os.open("/proc/sys/kernel/ns_last_pid", os.O_WRONLY | os.O_CLOEXEC)
        os.write(answer, b"1")
        while os.read(control, 1):
            os.write(answer, b"1" if _clean(last_pid) else b"0")
        code = 0
    finally:
        os._exit(code)


def _clean(last_pid: int) -> bool:
    """In a slot's holder, after a call: True once nothing of the call is
    left in the slot's namespaces, and the next call's processes are
    numbered from 2 again (as in a new namespace: no call learns from its
    pid how many processes the last one made)."""
    deadline = time.monotonic() + CLEAN_DEADLINE_S
    while not _empty():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    os.pwrite(last_pid, b"1", 0)
    return True


def _empty() -> bool:
    """Kill every process of this PID namespace but its init (this one); True
    when there was none, and this network namespace holds no socket either
    (a unix socket whose descriptor was in flight when its processes died
    lasts until the kernel's garbage collector frees it)."""
    # kill(-1) from a namespace's init reaches every other process of the
    # namespace, in one pass under the kernel's task-list lock; ESRCH means
    # none is left, not even one still exiting.
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        with open("/proc/self/net/unix", "rb") as sockets:
            return sockets.read().count(b"\n") <= 1  # a header line, then one line per socket
    return False


def close_all_but(keep: set[int]) -> None:
    """Close every descriptor above 2 not in `keep` (a forked helper's
    inheritance from the launcher: calls' pipes, its socket)."""
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


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
            close_all_but({ready_w, hold_r})
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
    if "slot" in given:
        flags |= CLONE_NEWPID | CLONE_NEWNET
    for name, flag, _ in ONCE:
        if name in given:
            flags |= flag
    return flags
