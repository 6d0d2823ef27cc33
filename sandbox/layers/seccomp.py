"""Layer seccomp: a system-call filter, the last layer before the plugin.

Detected: x86_64 with seccomp filters, and a forked probe whose unshare the
filter refuses. Host: nothing. Child: `apply_seccomp` after Landlock.

One table per concern, each entry with the reason it is there. The filter
checks the architecture (kill), then finds the system call by a binary
search among those it treats apart: denied outright, clone flags, socket
families, fcntl commands; everything else is allowed.
The numbers are x86_64's: on any other architecture the layer is reported
missing (and `apply_seccomp` refuses), never applied with the wrong numbers.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import platform
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from sandbox.layers.kernel import PR_SET_NO_NEW_PRIVS, IsolationError, fork_probe, libc, prctl

PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
AUDIT_ARCH_X86_64 = 0xC000003E
EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97
CLONE_NAMESPACES = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JSET_K, BPF_JGE_K, BPF_RET_K = 0x20, 0x15, 0x45, 0x35, 0x06
# Offsets in struct seccomp_data; an argument's low 32 bits (little endian).
DATA_NR, DATA_ARCH, DATA_ARG0, DATA_ARG1, DATA_ARG2 = 0, 4, 16, 24, 32

# x86_64 system calls a plugin never needs, each with the reason it is denied.
DENIED_X86_64 = {
    101: "ptrace: inspecting or steering another process",
    310: "process_vm_readv: reading another process's memory",
    311: "process_vm_writev: writing another process's memory",
    165: "mount: changing the file system view",
    166: "umount2: changing the file system view",
    155: "pivot_root: changing the root directory",
    161: "chroot: changing the root directory",
    272: "unshare: new namespaces are kernel attack surface",
    308: "setns: joining other namespaces",
    250: "keyctl: the kernel keyring is shared state",
    248: "add_key: the kernel keyring is shared state",
    249: "request_key: the kernel keyring is shared state",
    321: "bpf: loading kernel programs",
    298: "perf_event_open: side channels and kernel attack surface",
    175: "init_module: loading kernel modules",
    313: "finit_module: loading kernel modules",
    176: "delete_module: unloading kernel modules",
    246: "kexec_load: replacing the kernel",
    320: "kexec_file_load: replacing the kernel",
    169: "reboot: stopping the machine",
    167: "swapon: changing swap",
    168: "swapoff: changing swap",
    163: "acct: process accounting",
    164: "settimeofday: changing the clock",
    227: "clock_settime: changing the clock",
    159: "adjtimex: changing the clock",
    305: "clock_adjtime: changing the clock",
    172: "iopl: raw I/O port access",
    173: "ioperm: raw I/O port access",
    154: "modify_ldt: x86 segment descriptors, a history of kernel exploits",
    323: "userfaultfd: a common exploit primitive",
    304: "open_by_handle_at: bypasses path-based checks",
    303: "name_to_handle_at: pairs with open_by_handle_at",
    179: "quotactl: file system quotas",
    103: "syslog: the kernel log",
    153: "vhangup: terminal hang-up",
    425: "io_uring_setup: large kernel attack surface",
    426: "io_uring_enter: large kernel attack surface",
    427: "io_uring_register: large kernel attack surface",
    428: "open_tree: new mount API",
    429: "move_mount: new mount API",
    430: "fsopen: new mount API",
    431: "fsconfig: new mount API",
    432: "fsmount: new mount API",
    433: "fspick: new mount API",
    442: "mount_setattr: new mount API",
    135: "personality: turning off address space randomisation",
}

# Concurrent calls read the same interpreter, standard library and package
# files (read-only, but the same inodes). These calls turn that sharing into
# a channel between calls, or let one call watch what another opens.
DENIED_SHARED_FILES_X86_64 = {
    73: "flock: a lock on a shared read-only file is seen by every other call",
    253: "inotify_init: a watch on a shared directory shows which files other calls open",
    294: "inotify_init1: a watch on a shared directory shows which files other calls open",
    300: "fanotify_init: watches file access beyond the caller's own files",
}

# With the IPC namespace shared between calls (sandbox.layers.shared), every
# System V IPC and POSIX message queue call: their objects live in that namespace.
DENIED_SHARED_IPC_X86_64 = {
    29: "shmget: System V shared memory, seen by every call of the shared IPC namespace",
    30: "shmat: System V shared memory",
    31: "shmctl: System V shared memory",
    67: "shmdt: System V shared memory",
    64: "semget: System V semaphores, seen by every call of the shared IPC namespace",
    65: "semop: System V semaphores",
    66: "semctl: System V semaphores",
    220: "semtimedop: System V semaphores",
    68: "msgget: System V message queues, seen by every call of the shared IPC namespace",
    69: "msgsnd: System V message queues",
    70: "msgrcv: System V message queues",
    71: "msgctl: System V message queues",
    240: "mq_open: POSIX message queues, seen by every call of the shared IPC namespace",
    241: "mq_unlink: POSIX message queues",
    242: "mq_timedsend: POSIX message queues",
    243: "mq_timedreceive: POSIX message queues",
    244: "mq_notify: POSIX message queues",
    245: "mq_getsetattr: POSIX message queues",
}

# Where no memory cgroup counts a call's pages (an unprivileged host without a
# delegated cgroup), memory the call can hold outside its processes' RSS and
# address space, which the watchdog and RLIMIT_AS bound: refused, with the
# System V and POSIX queue calls above. A memfd's pages written with write(2)
# are in no process's RSS; a System V segment detached after its pages were
# touched, a queued message and a semaphore set are in no process at all.
# Shared memory stays available in the call's own /dev/shm, a tmpfs of a
# fixed size (`sandbox.layers.mnt`).
DENIED_UNCOUNTED_MEMORY_X86_64 = {
    319: "memfd_create: pages held outside RSS where no memory cgroup counts them",
}
# Socket buffers are kernel memory no RSS shows either, and a memory cgroup
# does not count a unix socket's (cgroup v2 counts TCP's alone: make vm-test
# saw a call hold 1.6 GB of raised unix buffers under its v2 limit). So every
# call keeps the system's default buffer sizes (net.core.wmem_default, about
# 208 KiB): setsockopt may not raise them (EPERM); at most max_processes x
# max_open_files sockets of that size. Where nothing counts a call's memory,
# only AF_UNIX opens as well: TCP on loopback grows its own buffers to
# net.ipv4.tcp_rmem's maximum (32 MiB here).
SYS_SETSOCKOPT_X86_64, SOL_SOCKET = 54, 1
DENIED_BUFFER_OPTIONS = {
    7: "SO_SNDBUF: a send buffer up to net.core.wmem_max, uncounted",
    8: "SO_RCVBUF: a receive buffer up to net.core.rmem_max, uncounted",
    32: "SO_SNDBUFFORCE: the same past the maximum",
    33: "SO_RCVBUFFORCE: the same past the maximum",
}

# fcntl(2) commands denied for the same reason (args[1]); the rest are allowed.
SYS_FCNTL_X86_64 = 72
DENIED_FCNTL_COMMANDS = {
    5: "F_GETLK: shows the record locks other calls hold on shared files",
    6: "F_SETLK: a read lock on a shared read-only file is seen by every other call",
    7: "F_SETLKW: a read lock on a shared read-only file is seen by every other call",
    36: "F_OFD_GETLK: shows the record locks other calls hold on shared files",
    37: "F_OFD_SETLK: a read lock on a shared read-only file is seen by every other call",
    38: "F_OFD_SETLKW: a read lock on a shared read-only file is seen by every other call",
    1026: "F_NOTIFY: dnotify, a watch on a shared directory like inotify",
}

# socket(2) and socketpair(2) take the address family in args[0]. Only these
# open; every other family fails with EAFNOSUPPORT, the answer of a kernel
# built without it, which libraries already treat as "not here" (glibc's
# getaddrinfo, for one, carries on without its netlink probe). EPERM would
# read as a broken machine rather than an absent family.
SYS_SOCKET_X86_64, SYS_SOCKETPAIR_X86_64 = 41, 53
ALLOWED_SOCKET_FAMILIES = {
    1: "AF_UNIX: pipes between a plugin's own processes; Landlock scopes abstract sockets",
    2: "AF_INET: loopback of the call's own empty network namespace",
    10: "AF_INET6: loopback of the call's own empty network namespace",
}
# A call in its uid's reused network namespace (sandbox.layers.shared, Slots)
# gets AF_UNIX alone: an IP socket could leave state there (a counter of
# /proc/net/snmp, a fragment queue, a TIME_WAIT entry) that the next call of
# the namespace could read. Unix sockets end with their processes.
SLOT_SOCKET_FAMILIES = {1: ALLOWED_SOCKET_FAMILIES[1]}
# Every other family up to AF_MAX (46) of Linux 6.x, with why it is refused.
# Families a later kernel adds are refused too: the filter is an allow-list.
DENIED_SOCKET_FAMILIES = {
    0: "AF_UNSPEC: not a family",
    3: "AF_AX25: amateur radio",
    4: "AF_IPX: legacy protocol, kernel attack surface",
    5: "AF_APPLETALK: legacy protocol, kernel attack surface",
    6: "AF_NETROM: amateur radio",
    7: "AF_BRIDGE: multiprotocol bridge",
    8: "AF_ATMPVC: ATM hardware",
    9: "AF_X25: legacy protocol, kernel attack surface",
    11: "AF_ROSE: amateur radio",
    12: "AF_DECnet: legacy protocol, kernel attack surface",
    13: "AF_NETBEUI: legacy protocol",
    14: "AF_SECURITY: security callbacks",
    15: "AF_KEY: IPsec key management",
    16: "AF_NETLINK: kernel interfaces, uevents are machine-wide (not namespaced)",
    17: "AF_PACKET: raw link-layer frames",
    18: "AF_ASH: unused",
    19: "AF_ECONET: legacy protocol",
    20: "AF_ATMSVC: ATM hardware",
    21: "AF_RDS: reliable datagram sockets, a history of kernel exploits",
    22: "AF_SNA: legacy protocol",
    23: "AF_IRDA: infrared hardware",
    24: "AF_PPPOX: PPP tunnels",
    25: "AF_WANPIPE: WAN hardware",
    26: "AF_LLC: link-layer control",
    27: "AF_IB: InfiniBand hardware",
    28: "AF_MPLS: label switching",
    29: "AF_CAN: CAN bus hardware",
    30: "AF_TIPC: cluster protocol, kernel attack surface",
    31: "AF_BLUETOOTH: radio hardware",
    32: "AF_IUCV: s390 hypervisor communication",
    33: "AF_RXRPC: AFS remote procedure calls",
    34: "AF_ISDN: ISDN hardware",
    35: "AF_PHONET: modem protocol",
    36: "AF_IEEE802154: low-rate radio",
    37: "AF_CAIF: modem protocol",
    38: "AF_ALG: the kernel crypto API, a history of kernel exploits",
    39: "AF_NFC: radio hardware",
    40: "AF_VSOCK: VM-wide ports, reaches the hypervisor outside the network namespace",
    41: "AF_KCM: kernel connection multiplexor",
    42: "AF_QIPCRTR: Qualcomm IPC router",
    43: "AF_SMC: shared-memory communication over RDMA",
    44: "AF_XDP: raw frames of a network interface",
    45: "AF_MCTP: management component transport, hardware",
}
SYS_CLONE_X86_64, SYS_CLONE3_X86_64 = 56, 435


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


# A program being assembled: instructions whose jumps name labels (None: the
# next instruction), and the labels themselves; `_assemble` turns the names
# into the forward offsets classic BPF has.
Item = tuple[str, int, int, str | None, str | None]  # ("insn", code, k, jt, jf)


def _op(code: int, k: int, jt: str | None = None, jf: str | None = None) -> Item:
    return ("insn", code, k, jt, jf)


def _search(calls: list[tuple[int, str]], otherwise: str, names: Iterator[int]) -> list[Any]:
    """A binary search for the system call number (in A) among `calls`
    (sorted (number, label) pairs): jump to its label, or to `otherwise`.
    A call takes about log2(len(calls)) comparisons, where a chain of
    comparisons would take up to len(calls): the kernel runs the filter
    for every system call it cannot answer from its cache, and once per
    system call number when the filter is installed."""
    if len(calls) <= 3:
        return [
            _op(BPF_JEQ_K, number, label, otherwise if index == len(calls) - 1 else None)
            for index, (number, label) in enumerate(calls)
        ]
    middle = len(calls) // 2
    upper = f"upper{next(names)}"
    return [
        _op(BPF_JGE_K, calls[middle][0], upper),
        *_search(calls[:middle], otherwise, names),
        ("label", upper),
        *_search(calls[middle:], otherwise, names),
    ]


def _argument_in(offset: int, values: Iterable[int], inside: str, outside: str) -> list[Any]:
    """Jump to `inside` if the argument at `offset` is one of `values`, else `outside`."""
    values = list(values)
    program: list[Any] = [_op(BPF_LD_W_ABS, offset)]
    for index, value in enumerate(values):
        program.append(_op(BPF_JEQ_K, value, inside, outside if index == len(values) - 1 else None))
    return program


def _assemble(items: list[Any]) -> bytes:
    """The program's bytes, each label name resolved to a forward offset."""
    at: dict[str, int] = {}
    count = 0
    for item in items:
        if item[0] == "label":
            at[item[1]] = count
        else:
            count += 1
    program: list[bytes] = []
    for item in items:
        if item[0] == "label":
            continue
        _, code, k, jt, jf = item
        here = len(program)
        offsets = [0 if label is None else at[label] - here - 1 for label in (jt, jf)]
        if not all(0 <= offset <= 255 for offset in offsets):
            raise ValueError(f"jump out of classic BPF's reach at instruction {here}")
        program.append(_insn(code, k, offsets[0], offsets[1]))
    return b"".join(program)


@functools.cache
def seccomp_program(ipc: bool = True, ip: bool = True, counted: bool = True) -> bytes:
    """The BPF filter: wrong architecture or an x32 call -> kill; the calls of
    DENIED_X86_64 and DENIED_SHARED_FILES_X86_64 -> EPERM; clone with
    namespace flags -> EPERM; clone3 -> ENOSYS (libc falls back to clone,
    whose flags the filter can read); socket and socketpair outside
    ALLOWED_SOCKET_FAMILIES -> EAFNOSUPPORT; fcntl with DENIED_FCNTL_COMMANDS
    -> EPERM; everything else allowed. Without `ipc` the calls of
    DENIED_SHARED_IPC_X86_64 are refused too (a call in the IPC namespace
    its launcher shares between calls); without `ip`, every family but
    SLOT_SOCKET_FAMILIES (a call in its uid's reused network namespace);
    without `counted` (no memory cgroup counts the call's pages), those of
    DENIED_UNCOUNTED_MEMORY_X86_64 and DENIED_SHARED_IPC_X86_64, and every
    family but AF_UNIX. setsockopt with DENIED_BUFFER_OPTIONS -> EPERM
    everywhere.
    Built once per process and variant: the launcher builds them before it
    forks, so a call only installs one.

    The system call number is found by a binary search (`_search`) among
    every number the filter treats apart, which leads to that number's
    block or return; every other number goes straight to "allow"."""
    return program_with(_search, ipc, ip, counted)


Search = Callable[[list[tuple[int, str]], str, Iterator[int]], list[Any]]


def program_with(search: Search, ipc: bool = True, ip: bool = True, counted: bool = True) -> bytes:
    """`seccomp_program`, with `search` finding the system call number
    (`scripts/seccomp_cost.py` measures another way against it)."""
    denied = [*DENIED_X86_64, *DENIED_SHARED_FILES_X86_64]
    if not ipc or not counted:
        denied += DENIED_SHARED_IPC_X86_64
    if not counted:
        denied += DENIED_UNCOUNTED_MEMORY_X86_64
    targets = {number: "eperm" for number in denied}
    targets[SYS_CLONE3_X86_64] = "enosys"
    targets[SYS_CLONE_X86_64] = "clone"
    targets[SYS_SOCKET_X86_64] = targets[SYS_SOCKETPAIR_X86_64] = "socket"
    targets[SYS_FCNTL_X86_64] = "fcntl"
    targets[SYS_SETSOCKOPT_X86_64] = "setsockopt"
    families = ALLOWED_SOCKET_FAMILIES if ip and counted else SLOT_SOCKET_FAMILIES
    items: list[Any] = [
        _op(BPF_LD_W_ABS, DATA_ARCH),
        _op(BPF_JEQ_K, AUDIT_ARCH_X86_64, None, "kill"),
        _op(BPF_LD_W_ABS, DATA_NR),
        # x32 system calls (nr >= 0x40000000) would bypass the numbers below.
        _op(BPF_JGE_K, 0x40000000, "kill"),
        *search(sorted(targets.items()), "allow", itertools.count()),
        ("label", "clone"),
        _op(BPF_LD_W_ABS, DATA_ARG0),  # the flags
        _op(BPF_JSET_K, CLONE_NAMESPACES, "eperm", "allow"),
        ("label", "socket"),
        *_argument_in(DATA_ARG0, families, inside="allow", outside="eafnosupport"),
        ("label", "fcntl"),
        *_argument_in(DATA_ARG1, DENIED_FCNTL_COMMANDS, inside="eperm", outside="allow"),
        ("label", "setsockopt"),
        _op(BPF_LD_W_ABS, DATA_ARG1),  # the level
        _op(BPF_JEQ_K, SOL_SOCKET, None, "allow"),
        *_argument_in(DATA_ARG2, DENIED_BUFFER_OPTIONS, inside="eperm", outside="allow"),
    ]
    returns = {
        "allow": SECCOMP_RET_ALLOW,
        "eperm": SECCOMP_RET_ERRNO | EPERM,
        "enosys": SECCOMP_RET_ERRNO | ENOSYS,
        "eafnosupport": SECCOMP_RET_ERRNO | EAFNOSUPPORT,
        "kill": SECCOMP_RET_KILL_PROCESS,
    }
    for name, action in returns.items():
        items += [("label", name), _op(BPF_RET_K, action)]
    return _assemble(items)


def seccomp_supported() -> bool:
    return (
        platform.machine() == "x86_64" and Path("/proc/sys/kernel/seccomp/actions_avail").exists()
    )


# (ipc, ip, counted) -> the prctl argument for that variant, with the
# program it points to: made by `prepare_filters` in the launcher before it
# forks, so a call's child only makes the system call.
_PREPARED: dict[tuple[bool, bool, bool], tuple[Any, Any]] = {}


def prepare_filters() -> None:
    """Build every variant's program and prctl argument, where seccomp works."""
    if _PREPARED or not seccomp_supported():
        return
    for ipc, ip, counted in itertools.product((True, False), repeat=3):
        _PREPARED[ipc, ip, counted] = _filter_argument(seccomp_program(ipc, ip, counted))


def apply_seccomp(ipc: bool = True, ip: bool = True, counted: bool = True) -> None:
    """Install the filter (`seccomp_program`) on this process and its future
    children. Raises IsolationError."""
    prepared = _PREPARED.get((ipc, ip, counted))
    if prepared is None:
        if not seccomp_supported():
            raise IsolationError("seccomp", f"no filter for {platform.machine()}")
        prepared = _filter_argument(seccomp_program(ipc, ip, counted))
    _install(prepared[0])


def install_filter(code: bytes) -> None:
    """Install the BPF program `code` on this process and its future
    children (the caller has set no_new_privs). Raises IsolationError."""
    _install(_filter_argument(code)[0])


def _filter_argument(code: bytes) -> tuple[Any, Any]:
    """prctl's `struct sock_fprog` for `code`, and the buffer it points to
    (which must live as long as the argument)."""
    filters = ctypes.create_string_buffer(code, len(code))
    prog = struct.pack("=HxxxxxxQ", len(code) // 8, ctypes.addressof(filters))
    return ctypes.create_string_buffer(prog, len(prog)), filters


def _install(argument: Any) -> None:
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, argument, 0, 0) != 0:
        raise IsolationError("seccomp", os.strerror(ctypes.get_errno()))


def probe() -> bool:
    """Whether the filter can be installed here and does what it says (a
    forked child installs it and checks that unshare is refused)."""
    if not seccomp_supported():
        return False

    def attempt() -> bool:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        apply_seccomp()
        return bool(libc.unshare(0) != 0)  # unshare is denied by the filter

    return fork_probe(attempt)
