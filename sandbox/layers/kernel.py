"""Kernel primitives every layer uses: libc through ctypes, prctl, mount,
and the error a layer raises when the kernel refuses (fail closed)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import NoReturn

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36

# The C library the interpreter itself is linked with (dlopen(NULL)): no
# ctypes.util.find_library, which imports subprocess and with it threading,
# whose at-fork handler would then run in every child the launcher forks.
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
# Looked up here, once: ctypes makes a function object on a name's first
# use in a process, and the launcher's children inherit these.
for _name in ("mount", "umount2", "unshare", "setns", "prctl"):
    getattr(libc, _name)


class IsolationError(Exception):
    """A protection could not be applied; carries the step that failed."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step


def check(result: int, step: str) -> None:
    """Raise IsolationError for `step` if a libc call returned non-zero."""
    if result != 0:
        failed(step)


def failed(step: str) -> NoReturn:
    """Raise IsolationError for `step` with the errno of the libc call that
    just failed (callers on a hot path name the step only then)."""
    raise IsolationError(step, os.strerror(ctypes.get_errno()))


def prctl(option: int, arg: int) -> None:
    """Call prctl(2) with one argument."""
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        failed(f"prctl({option})")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    result = libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if result != 0:
        failed(f"mount {target}")


def unshare(flags: int) -> None:
    """unshare(2) `flags`. Raises IsolationError."""
    if libc.unshare(ctypes.c_int(flags)) != 0:
        failed(f"unshare({flags:#x})")


def fork_probe(attempt: Callable[[], bool]) -> bool:
    """Whether `attempt` returns True in a forked child (for detection; any
    exception there means False). Never used in a multi-threaded process."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if attempt() else 1)
        except BaseException:  # noqa: BLE001 - any failure means "not available"
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def argv_memory() -> tuple[int, int]:
    """Where this process's argv strings are: (arg_start, arg_end)."""
    with open("/proc/self/stat", "rb") as stream:
        stat = stream.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48 and 49


def set_command_line(title: bytes, where: tuple[int, int] | None = None) -> None:
    """Overwrite this process's argv memory (what /proc/<pid>/cmdline and ps
    show) with `title`, cut to fit, and NULs; `where` is `argv_memory()`,
    read again when not given."""
    start, end = where if where is not None else argv_memory()
    if 0 < start < end:
        ctypes.memset(start, 0, end - start)
        text = title[: end - start - 1]
        ctypes.memmove(start, text, len(text))
