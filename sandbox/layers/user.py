"""Layer user_namespace: how an unprivileged host builds the call's namespaces.

Detected: a child of an unprivileged host can unshare CLONE_NEWUSER and then
the other namespaces from it (a root host does not need it: its calls get
uids of their own, `sandbox.layers.privilege`).
Host: nothing.
Child: `enter_user_namespace` first of the namespaces; `drop_capabilities`
once the minimal root is built, before the plugin runs.
"""

from __future__ import annotations

import ctypes

from sandbox.layers.kernel import (
    PR_SET_DUMPABLE,
    IsolationError,
    check,
    libc,
    prctl,
    unshare,
)

CLONE_NEWUSER = 0x10000000


def enter_user_namespace(uid: int, gid: int) -> None:
    """Become root of a new user namespace in which only `uid`/`gid` exist,
    mapped to themselves: an unprivileged host gets the capabilities to build
    the other namespaces and the minimal root, over those namespaces only.
    `drop_capabilities` gives them up before the plugin runs."""
    unshare(CLONE_NEWUSER)
    # /proc/self of a process that is not dumpable belongs to root: the maps
    # could not be written. Dumpable only while they are, then not again.
    prctl(PR_SET_DUMPABLE, 1)
    try:
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{uid} {uid} 1"),
            ("gid_map", f"{gid} {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as stream:
                stream.write(text)
    except OSError as exc:
        raise IsolationError("user namespace", f"{name}: {exc.strerror}") from exc
    prctl(PR_SET_DUMPABLE, 0)


SYS_CAPSET = 126
LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
CAP_LAST_CAP_PATH = "/proc/sys/kernel/cap_last_cap"


def drop_capabilities() -> None:
    """Give up every capability for good: bounding, ambient, effective,
    permitted and inheritable sets all emptied."""
    with open(CAP_LAST_CAP_PATH) as stream:
        last = int(stream.read())
    for cap in range(last + 1):
        check(libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0), "drop bounding set")
    check(
        libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0),
        "clear ambient capabilities",
    )
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable}, all empty
    check(libc.syscall(SYS_CAPSET, header, data), "capset")
