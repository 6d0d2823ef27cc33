"""Layers privilege_drop and no_new_privs.

privilege_drop -- detected: the host runs as root. Host: a uid of its own per
call (`sandbox.supervisor.UidPool`, a lock file per uid). Child: `drop_privileges`
to that uid once the namespaces and rlimits are in place (RLIMIT_NPROC then
counts the call's processes).
no_new_privs -- detected: always (Linux 3.5+). Child: PR_SET_NO_NEW_PRIVS,
which Landlock and seccomp need and which makes setuid binaries inert.
"""

from __future__ import annotations

import os

from sandbox.layers.kernel import PR_SET_NO_NEW_PRIVS, IsolationError, prctl
from sandbox.layers.user import drop_capabilities


def drop_privileges(uid: int, gid: int) -> None:
    """Become `uid:gid` for good, with no supplementary groups."""
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise IsolationError("drop privileges", str(exc)) from exc
    if os.getuid() != uid or os.geteuid() != uid or 0 in os.getgroups():
        raise IsolationError("drop privileges", "uid did not change")


def give_up_privileges(uid: int | None, gid: int | None, user_namespace: bool) -> None:
    """Drop to the call's own uid (root host), or give up the capabilities a
    user namespace lent (unprivileged host)."""
    if uid is not None and gid is not None:
        drop_privileges(uid, gid)
    elif user_namespace:
        drop_capabilities()


def no_new_privs() -> None:
    """No execve may grant privileges again (setuid bits, file capabilities)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
