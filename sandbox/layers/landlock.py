"""Layer landlock: the file system (and, on newer kernels, TCP and signals)
restricted to what the call needs.

Detected: the kernel reports a Landlock ABI (`landlock_abi() >= 1`).
Host: nothing (the exposed paths travel in the ChildSpec).
Launcher: `prepare_rules` works out a call's rules before the fork.
Child: `apply` after no_new_privs, just before seccomp: one ruleset, its
rules added, then restrict_self.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from collections.abc import Iterable
from typing import Any

from sandbox.layers.kernel import IsolationError, libc

# What a plugin may read besides the interpreter, its packages and itself:
# shared libraries, the loader's cache, and its own /proc and /dev entries.
SYSTEM_READ_ONLY = (
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/proc",
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/urandom",
    "/dev/random",
    "/sys/devices/system/cpu",
)
WRITABLE_FILES = ("/dev/null",)

SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
FS_MAKE_SYM, FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABI = 6  # the first ABI with scopes: abstract unix sockets and signals
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
READ_ONLY = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR


def landlock_abi() -> int:
    """The Landlock ABI version of this kernel, 0 if there is none."""
    version = libc.syscall(
        SYS_LANDLOCK_CREATE_RULESET,
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(int(version), 0)


_ABI = 0  # the kernel's, once `prepare` asked (the launcher, before it forks)
_ATTRS: dict[int, tuple[Any, int]] = {}  # ABI -> struct landlock_ruleset_attr and its size
# The system calls' constant arguments, made once.
_PATH_BENEATH = ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH)
_NO_FLAGS = ctypes.c_uint32(0)
_RULE = ctypes.create_string_buffer(12)  # each process fills its own copy


def prepare() -> None:
    """Ask the kernel its ABI once and build its ruleset attribute, so that
    a call's child need not."""
    global _ABI
    if not _ABI:
        _ABI = landlock_abi()
    if _ABI >= 1:
        _ruleset_attr(_ABI)


def _abi() -> int:
    """The kernel's Landlock ABI: as `prepare` found it, or asked now."""
    return _ABI or landlock_abi()


def _ruleset_attr(abi: int) -> tuple[Any, int]:
    """What the ruleset handles on this ABI: every file system right, TCP
    bind and connect (ABI 4+), the abstract unix socket and signal scopes
    (ABI 6+); as the buffer `landlock_create_ruleset` takes, and its size."""
    found = _ATTRS.get(abi)
    if found is None:
        net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
        scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= SCOPE_ABI else 0
        attr = struct.pack("=QQQ", _fs_rights(abi), net, scoped)
        size = 8 if abi < 4 else (16 if abi < 6 else 24)
        found = _ATTRS[abi] = (ctypes.create_string_buffer(attr[:size], size), size)
    return found


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # EXECUTE .. MAKE_SYM: ABI 1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def apply_landlock(
    read_only: Iterable[str], read_write: Iterable[str], writable_files: Iterable[str]
) -> int:
    """Restrict this process (and its future children) to the given paths.

    Everything else on the file system becomes unreachable; on ABI 4+ no TCP
    bind or connect is allowed; on ABI 6+ signals and abstract unix sockets
    cannot reach processes outside the sandbox. Returns the ABI used.
    Needs no_new_privs (or CAP_SYS_ADMIN). Raises IsolationError.
    """
    abi = _abi()
    if abi < 1:
        raise IsolationError("landlock", "not supported by this kernel")
    key = (tuple(read_only), tuple(read_write), tuple(writable_files))
    rules = _RULES.get(key) or rules_for(*key)
    buffer, size = _ruleset_attr(abi)
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, buffer, ctypes.c_size_t(size), _NO_FLAGS)
    if ruleset < 0:
        raise IsolationError("landlock", os.strerror(ctypes.get_errno()))
    try:
        target = ctypes.c_int(ruleset)
        rule = _RULE  # struct landlock_path_beneath_attr, filled for each rule
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # nothing there to allow
            try:
                _add_rule(target, rule, path, fd, rights)
            finally:
                os.close(fd)
        if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, target, _NO_FLAGS) < 0:
            raise IsolationError("landlock", os.strerror(ctypes.get_errno()))
    finally:
        os.close(ruleset)
    return abi


def _add_rule(ruleset: Any, rule: Any, path: str, fd: int, rights: int) -> None:
    struct.pack_into("=Qi", rule, 0, rights, fd)
    if libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, _PATH_BENEATH, rule, _NO_FLAGS) >= 0:
        return
    error = ctypes.get_errno()
    if error == errno.EINVAL and rights & ~FILE_RIGHTS:
        # Planned as a directory, a file here: a file's rights only.
        struct.pack_into("=Qi", rule, 0, rights & FILE_RIGHTS, fd)
        if libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, _PATH_BENEATH, rule, _NO_FLAGS) >= 0:
            return
        error = ctypes.get_errno()
    raise IsolationError("landlock", f"rule for {path}: {os.strerror(error)}")


# (read-only, read-write, writable files) -> the rules that allow them, as
# `rules_for` works them out; the launcher does it before it forks (`prepare`).
_RULES: dict[tuple[tuple[str, ...], ...], tuple[tuple[str, int], ...]] = {}
MAX_RULE_SETS = 256


def rules_for(
    read_only: tuple[str, ...], read_write: tuple[str, ...], writable_files: tuple[str, ...]
) -> tuple[tuple[str, int], ...]:
    """The rules a ruleset needs for these paths: (path, rights) each, the
    rights of a path named twice joined, a file's reduced to what a file
    can be granted, and no rule for a link (/lib -> usr/lib) whose target a
    directory's rule grants as much already. Read from this process's view
    of the file system, which a minimal root repeats for every path it
    binds: a read-write path (the scratch directory, which a minimal root
    mounts itself) is taken as a directory, never looked at. A path missing
    here keeps its rule: the child tries it, and skips it if it is missing
    there too."""
    handled = _fs_rights(_abi())
    wanted: dict[str, int] = {}
    for paths, rights in ((read_only, READ_ONLY), (writable_files, FS_READ_FILE | FS_WRITE_FILE)):
        for path in paths:
            wanted[path] = wanted.get(path, 0) | rights
    found: list[tuple[str, int, str, bool]] = []  # path, rights, where it leads, a directory
    for path, rights in wanted.items():
        try:
            directory = stat.S_ISDIR(os.stat(path).st_mode)
        except OSError:
            directory = True  # unknown here: in the child, add_rule tells (`_add_rule`)
        real = os.path.realpath(path)
        found.append((path, rights if directory else rights & FILE_RIGHTS, real, directory))
    dirs = [(real, rights) for path, rights, real, directory in found if directory and path == real]
    rules = tuple(
        (path, rights & handled)
        for path, rights, real, _ in found
        if path == real or not any(_covers(d, r, real, rights) for d, r in dirs)
    )
    rules += tuple((path, handled) for path in read_write)
    if len(_RULES) >= MAX_RULE_SETS:
        _RULES.clear()
    _RULES[(read_only, read_write, writable_files)] = rules
    return rules


def _covers(directory: str, granted: int, path: str, rights: int) -> bool:
    """A rule on `directory` grants `rights` on `path` already."""
    return path.startswith(directory.rstrip("/") + "/") and rights & ~granted == 0


def apply(expose: Iterable[str], writable: tuple[str, ...]) -> int:
    """The call's rules: read `expose` and SYSTEM_READ_ONLY, write the
    directories `writable` (its scratch, and its own /dev/shm in a minimal
    root)."""
    return apply_landlock((*expose, *SYSTEM_READ_ONLY), writable, WRITABLE_FILES)


def prepare_rules(expose: Iterable[str], writable: tuple[str, ...]) -> None:
    """Work out `apply`'s rules before the fork (the launcher), so that the
    child only adds them."""
    key = ((*expose, *SYSTEM_READ_ONLY), writable, WRITABLE_FILES)
    if key not in _RULES:
        rules_for(*key)


def restrict_tool(
    readable: Iterable[str], writable_dirs: Iterable[str], writable_files: Iterable[str]
) -> int:
    """Restrict this process (and its future children) to reading and
    executing below `readable` (a path missing here is skipped) and to
    writing below `writable_dirs` and into `writable_files`. On ABI 4+ no
    TCP port can be bound (connecting stays allowed); on ABI 6+ signals and
    abstract unix sockets cannot reach processes outside the domain. For a
    tool that must reach a package index but read only the system and
    write only its own directories (the package installer). Returns the ABI
    used. Needs no_new_privs (or CAP_SYS_ADMIN). Raises IsolationError,
    also for a writable path that is missing."""
    abi = _abi()
    if abi < 1:
        raise IsolationError("landlock", "not supported by this kernel")
    handled = _fs_rights(abi)
    net = NET_BIND_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= SCOPE_ABI else 0
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    attr = ctypes.create_string_buffer(struct.pack("=QQQ", handled, net, scoped)[:size], size)
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(size), _NO_FLAGS)
    if ruleset < 0:
        raise IsolationError("landlock", os.strerror(ctypes.get_errno()))
    try:
        target = ctypes.c_int(ruleset)
        rule = ctypes.create_string_buffer(12)
        rules = [(p, READ_ONLY & handled, False) for p in readable]
        rules += [(p, handled, True) for p in writable_dirs]
        rules += [
            (p, handled & (FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE), True)
            for p in writable_files
        ]
        for path, rights, needed in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError as exc:
                if not needed and exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue  # nothing there to allow
                raise IsolationError("landlock", f"rule for {path}: {exc.strerror}") from None
            try:
                _add_rule(target, rule, path, fd, rights)
            finally:
                os.close(fd)
        if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, target, _NO_FLAGS) < 0:
            raise IsolationError("landlock", os.strerror(ctypes.get_errno()))
    finally:
        os.close(ruleset)
    return abi
