"""Kernel isolation the sandbox child applies to itself, as root, before it
drops to its per-call uid and imports plugin code.

All of it runs in the freshly forked child, single-threaded. Every function
raises `IsolationError` when the kernel refuses; the child then exits
without running the plugin (fail closed).

The private mount namespace exists for one reason in this module: a child
that drops to an unprivileged uid must still reach the Python installation
and the plugin, which may sit below a directory only root may enter (such as
`/root`). Such a directory is covered, in the child's namespace only, with an
empty tmpfs, and just the paths the child needs are bound back read-only. The
host's own file permissions are never loosened.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
from collections.abc import Iterable

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class IsolationError(Exception):
    """A protection could not be applied; carries the step that failed."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step


def _check(result: int, step: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise IsolationError(step, os.strerror(errno))


def prctl(option: int, arg: int) -> None:
    """Call prctl(2) with one argument."""
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    result = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(result, f"mount {target}")


def _bind_readonly(source: str, target: str) -> None:
    _mount(source, target, None, MS_BIND | MS_REC, None)
    _mount("none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)


def hidden_ancestor(path: str) -> str | None:
    """Return the first directory on the way to `path` that others may not enter."""
    current = "/"
    for part in [p for p in os.path.abspath(path).split("/") if p]:
        current = os.path.join(current, part)
        try:
            mode = os.stat(current).st_mode
        except OSError:
            return None
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return current
    return None


def plan_exposure(needed: Iterable[str]) -> dict[str, list[str]]:
    """Group the paths a child must read by the hidden directory above them.

    Returns `{hidden_dir: [paths to bind back below it]}`, dropping paths that
    are reachable already and paths inside another path that is bound anyway.
    """
    paths = sorted({os.path.realpath(p) for p in needed if os.path.exists(p)})
    kept: list[str] = []
    for path in paths:
        if not any(path == k or path.startswith(k + "/") for k in kept):
            kept.append(path)
    plan: dict[str, list[str]] = {}
    for path in kept:
        hidden = hidden_ancestor(path)
        if hidden is not None:
            plan.setdefault(hidden, []).append(path)
    # A hidden directory below another one is covered by the outer tmpfs.
    for inner in list(plan):
        outer = hidden_ancestor(os.path.dirname(inner))
        if outer is not None and outer != inner and outer in plan:
            plan[outer].extend(plan.pop(inner))
    return plan


SCRATCH = "/tmp/work"


def enter_mount_namespace(
    needed: Iterable[str], uid: int, scratch_mb: int, extra_namespaces: int = 0
) -> str:
    """Give the child a private mount namespace (and `extra_namespaces`, more
    CLONE_NEW* flags, in the same step); return its scratch directory.

    The child's `/tmp` becomes an empty read-only tmpfs holding only the
    scratch directory (`SCRATCH`, a tmpfs of `scratch_mb` owned by `uid`,
    gone with the namespace) and any needed path that lived below the old
    `/tmp`. `/var/tmp` and `/dev/shm` are emptied the same way. Hidden
    directories are covered as the module docstring explains, with `needed`
    bound back read-only.
    """
    plan = plan_exposure(needed)
    under_tmp = [p for p in sorted({os.path.realpath(n) for n in needed}) if p.startswith("/tmp/")]
    _check(
        _libc.unshare(CLONE_NEWNS | extra_namespaces),
        f"unshare({CLONE_NEWNS | extra_namespaces:#x})",
    )
    # Nothing done below may propagate back to the host's namespace.
    _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    # Keep a handle on each path before a tmpfs covers it.
    handles = {p: os.open(p, os.O_PATH) for paths in plan.values() for p in paths}
    handles.update({p: os.open(p, os.O_PATH) for p in under_tmp if p not in handles})
    try:
        for hidden, paths in plan.items():
            if hidden == "/tmp" or hidden.startswith("/tmp/"):
                continue  # the new /tmp below covers it
            _mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
            _bind_back(paths, handles)
            _mount("none", hidden, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        _bind_back([p for p in handles if p.startswith("/tmp/")], handles)
        os.mkdir(SCRATCH, 0o700)
        _mount("tmpfs", "/tmp", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        _mount(
            "tmpfs",
            SCRATCH,
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            f"mode=0700,uid={uid},gid={uid},size={scratch_mb}m",
        )
    finally:
        for fd in handles.values():
            os.close(fd)
    for private in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(private):
            _mount("tmpfs", private, "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "mode=0755,size=4k")
    return SCRATCH


def _bind_back(paths: Iterable[str], handles: dict[str, int]) -> None:
    for path in paths:
        fd = handles[path]
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(path, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            with open(path, "wb"):
                pass
        _bind_readonly(f"/proc/self/fd/{fd}", path)


def mount_proc() -> None:
    """Mount a /proc that shows only the caller's PID namespace."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)


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
