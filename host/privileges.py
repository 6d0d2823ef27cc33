"""The HTTP server gives up root once the sandbox is set up (`user` setting).

    plughost serve, started as root
      |  start the launcher (root: it forks every call, which needs root to
      |  take a per-call uid), detect the layers, sweep stale cgroups,
      |  open the job store, run the start-up self-check
      |  hand over what the server writes per call: the job store's directory,
      |  the call cgroups' parents, the uid and host lock directories
      v  setgroups([]), setresgid, setresuid(user) -- for every thread
    the server parses requests and runs the services as `user`; calls still
    get per-call uids and cgroups, from the launcher

A bug in request parsing then yields an unprivileged process, not root. The
launcher is not started again after the drop: if it dies, calls fail with
an InternalError until the service is restarted.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable
from pathlib import Path


class PrivilegeError(Exception):
    """The server could not become the configured user; it does not serve."""


def drop_to(user: str, hand_over: Iterable[Path]) -> None:
    """Give the paths in `hand_over` (and the files directly in them) to
    `user`, then become `user` for good. Raises PrivilegeError."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError as exc:
        raise PrivilegeError(f"user {user!r} does not exist") from exc
    if entry.pw_uid == 0:
        raise PrivilegeError(f"user {user!r} is root; name an unprivileged user")
    if os.geteuid() != 0:
        raise PrivilegeError(f"the server runs as uid {os.geteuid()}, not root: nothing to drop")
    try:
        for path in hand_over:
            if not path.exists():
                continue
            os.chown(path, entry.pw_uid, entry.pw_gid)
            if path.is_dir():
                for child in path.iterdir():
                    if child.is_file() and not child.is_symlink():
                        os.chown(child, entry.pw_uid, entry.pw_gid)
        os.setgroups([])
        os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
        os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    except OSError as exc:
        raise PrivilegeError(f"could not become {user!r}: {exc}") from exc
    if os.getresuid() != (entry.pw_uid,) * 3 or 0 in os.getgroups():
        raise PrivilegeError(f"could not become {user!r}: still privileged")
