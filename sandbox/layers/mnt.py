"""Layers mount_namespace and tmpfs_scratch: the call's minimal root.

Detected: a child can unshare CLONE_NEWNS (root, or in a user namespace).
Host: nothing (the paths to expose travel in the ChildSpec).
Child: `build_minimal_root` (one unshare for the mount namespace and the
other namespaces of the call), then `enter_minimal_root`.

The child gets a minimal root of its own (`enter_minimal_root`): a private
mount namespace whose root is an empty tmpfs holding only what a plugin
needs, bound in read-only at the paths it has on the host::

    /usr /lib* /bin /sbin     system programs and shared libraries (or the
                              host's symlinks to them, on a merged /usr)
    /etc/ld.so.cache ...      the loader's cache, the time zone
    <interpreter>             sys.base_prefix: the interpreter and stdlib
    <environment>             the plugin's packages (site-packages)
    <plugin directory>        the plugin itself
    /dev                      null, zero, full, random, urandom; fd links
    /proc                     mounted later, of the call's PID namespace
    /sys/devices/system/cpu   CPU count and topology
    /tmp/work                 the scratch directory: a tmpfs owned by the call
    /dev/shm                  POSIX shared memory and semaphores: a tmpfs of
                              the call's own, the size of its memory limit

Nothing else of the host's file system exists there: no unix socket of a
host service, no job store, no host file whose name or size could be read
with stat. The root is then `pivot_root`ed into and the host's tree is
detached; the root tmpfs is made read-only. The host's own file permissions
are never loosened: a directory only root may enter (such as `/root`) stays
so on the host, and in the minimal root it is a plain directory of the tmpfs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from sandbox.layers.kernel import check, libc, mount, unshare

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
SCRATCH = "/tmp/work"
SHM = "/dev/shm"
NEW_ROOT = "/tmp"  # a mount point of this namespace only; covered by the new root
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
DEVICE_LINKS = {
    "/dev/fd": "/proc/self/fd",
    "/dev/stdin": "/proc/self/fd/0",
    "/dev/stdout": "/proc/self/fd/1",
    "/dev/stderr": "/proc/self/fd/2",
}
CPU_INFO = "/sys/devices/system/cpu"
SYS_PIVOT_ROOT = 155
HIDE_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
MNT_DETACH = 2


def plan_binds(needed: Iterable[str]) -> list[str]:
    """The host paths to bind into the minimal root, outermost first.

    System directories and files come first; a needed path inside one that is
    bound anyway is dropped; missing paths are dropped. Symlinks are followed
    (the bind lands at the resolved path; `build_minimal_root` also recreates
    the link itself where its name differs).
    """
    candidates = [*SYSTEM_DIRS, *SYSTEM_FILES, CPU_INFO, *needed]
    paths = sorted(
        {os.path.realpath(p) for p in candidates if os.path.exists(p)},
        key=lambda p: (p.count("/"), p),
    )
    kept: list[str] = []
    for path in paths:
        if not any(path == k or path.startswith(k + "/") for k in kept):
            kept.append(path)
    return kept


def _links(needed: Iterable[str]) -> dict[str, str]:
    """Symlinks of the host to recreate in the minimal root: name -> target.

    For each path, the first component that is a symlink on the host (a
    merged /usr's `/lib -> usr/lib`, a `/home -> var/home`), so the path
    still resolves by its old name. Its target is bound at its real path.
    """
    links: dict[str, str] = {}
    for path in [*SYSTEM_DIRS, *SYSTEM_FILES, *needed]:
        current = ""
        for part in [p for p in os.path.abspath(path).split("/") if p]:
            current += "/" + part
            if os.path.islink(current):
                links[current] = os.readlink(current)
                break
    return links


def build_minimal_root(
    needed: Iterable[str],
    uid: int,
    gid: int,
    sizes: tuple[int, int],
    extra_namespaces: int = 0,
    hidden: Iterable[str] = (),
) -> None:
    """Enter a private mount namespace (and `extra_namespaces`, more CLONE_NEW*
    flags, in the same step) and build the minimal root of the module
    docstring plus `needed` at NEW_ROOT; `enter_minimal_root` switches to it.

    The scratch directory (`SCRATCH`) and `SHM` are tmpfs of `sizes` (MB,
    in that order) owned by `uid`:`gid`, gone with the namespace.
    """
    needed = list(needed)
    binds, links = plan_binds(needed), _links(needed)
    unshare(CLONE_NEWNS | extra_namespaces)
    # Nothing done below may propagate back to the host's namespace.
    mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    _populate(NEW_ROOT, binds, links, hidden)
    _mount_own(NEW_ROOT, uid, gid, sizes)


def build_root_template(needed: Iterable[str], hidden: Iterable[str] = ()) -> None:
    """Make this process's mount namespace a template of the minimal root for
    `needed`: built as `build_minimal_root` does, without a scratch tmpfs or
    /proc, then made the namespace's root (read-only, the host's tree
    detached). A call copies it (`enter_root_copy`) instead of building its
    own; a root launcher keeps one per plugin (`sandbox.layers.shared`)."""
    needed = list(needed)
    binds, links = plan_binds(needed), _links(needed)
    unshare(CLONE_NEWNS)
    mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    _populate(NEW_ROOT, binds, links, hidden)
    _switch_root()


def enter_root_copy(uid: int, gid: int, sizes: tuple[int, int], extra_namespaces: int = 0) -> None:
    """In a template's namespace (joined with setns): take a private copy of
    it (and `extra_namespaces`, in the same unshare) and mount the call's own
    scratch and /dev/shm tmpfs in the copy. /proc comes with the PID
    namespace's init (`mount_own_proc`)."""
    unshare(CLONE_NEWNS | extra_namespaces)
    _mount_own("", uid, gid, sizes)


def mount_own_proc(hide_others: bool = False) -> None:
    """Mount the /proc of this process's PID namespace in a copied root; with
    `hide_others`, a process sees only the processes it may trace there
    (hidepid=2, "invisible": not the namespace's root-owned init; the
    number, which every kernel since 3.3 reads, where only 5.8+ reads the
    word)."""
    options = "hidepid=2" if hide_others else None
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, options)


def _mount_own(root: str, uid: int, gid: int, sizes: tuple[int, int]) -> None:
    """The call's own tmpfs below `root`: its scratch and its /dev/shm (where
    `multiprocessing`'s locks, POSIX semaphores and `SharedMemory` live),
    each of the size given in MB. A memory cgroup counts their pages in the
    call's memory; without one their sizes bound them."""
    for target, size_mb in zip((SCRATCH, SHM), sizes, strict=True):
        mount(
            "tmpfs",
            root + target,
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            f"mode=0700,uid={uid},gid={gid},size={size_mb}m",
        )


def _populate(root: str, binds: list[str], links: dict[str, str], hidden: Iterable[str]) -> None:
    """The minimal root's tmpfs at `root`, with its binds, links and devices,
    and the directories /proc, /tmp and the scratch directory."""
    # Handles on every source, taken before the new root covers any of them.
    devices = [d for d in DEVICES if os.path.exists(d)]
    handles = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in [*binds, *devices]}
    try:
        mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for name, target in links.items():
            if not os.path.lexists(root + name):
                os.makedirs(os.path.dirname(root + name), mode=0o755, exist_ok=True)
                os.symlink(target, root + name)
        for path in binds:  # real paths: never below one of the links
            _bind_into(root, path, handles[path], devices=False)
        for path in hidden:  # package directories inside a bound tree: emptied
            if os.path.isdir(root + path):
                mount("tmpfs", root + path, "tmpfs", HIDE_FLAGS, "size=4k,mode=0555")
        for device in devices:
            _bind_into(root, device, handles[device], devices=True)
        for name, target in DEVICE_LINKS.items():
            os.symlink(target, root + name)
        for directory in ("/proc", "/tmp", SCRATCH, SHM):
            os.makedirs(root + directory, mode=0o755, exist_ok=True)
    finally:
        for fd in handles.values():
            os.close(fd)


def enter_minimal_root(own_pid_namespace: bool) -> str:
    """Give the minimal root a /proc, make it the root of the whole mount
    namespace and detach the host's tree; return the scratch directory.

    With `own_pid_namespace` the caller is inside its new PID namespace and
    /proc is a new instance that shows only that namespace; it is mounted
    before the host's tree goes, because in a user namespace the kernel
    allows a new /proc only while a complete one is visible. Without one,
    the host's /proc is bound in (a user namespace may not mount a /proc of
    a PID namespace it does not own).
    """
    if own_pid_namespace:
        mount("proc", NEW_ROOT + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    else:
        mount("/proc", NEW_ROOT + "/proc", None, MS_BIND | MS_REC, None)
    _switch_root()
    return SCRATCH


def _switch_root() -> None:
    """Make NEW_ROOT the root of this mount namespace, detach the host's
    tree and make the root read-only."""
    os.chdir(NEW_ROOT)
    # pivot_root(".", "."): the old root ends up stacked on the new one, and
    # is then detached; no directory for it is needed in the new root.
    check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir("/")
    mount("none", "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)


def _bind_into(root: str, path: str, fd: int, devices: bool) -> None:
    target = root + path
    if os.path.isdir(f"/proc/self/fd/{fd}"):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        with open(target, "wb"):
            pass
    mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC, None)
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID
    flags |= MS_NOEXEC if devices else MS_NODEV
    mount("none", target, None, flags | _kept_flags(fd), None)


def _kept_flags(fd: int) -> int:
    """The source mount's nosuid, nodev and noexec: a bind remount must keep
    them. A mount seen from a user namespace has them locked (systemd mounts
    /sys nosuid,nodev,noexec), and a remount that would clear one fails with
    EPERM. The ST_* bits of statvfs are the MS_* bits of mount(2)."""
    return os.fstatvfs(fd).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
