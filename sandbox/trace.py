"""Timestamps of a call's phases, for `scripts/phases.py` (every process).

Off unless `enable` was called: `mark` is then a C function that ignores
its arguments (a dict's `get`), so a call that is not traced runs no code
of this module and pays no Python call for its marks. When on,
each mark appends one line to the trace file: thread id (a single-threaded
process's pid), label, CLOCK_MONOTONIC
(one clock for every process of the machine) and the calling thread's CPU
time (CLOCK_THREAD_CPUTIME_ID; a forked process starts at zero), the
thread's minor page faults so far (`ru_minflt` of RUSAGE_THREAD; a forked
process starts at zero too), and optional values (the launcher's CPU total
and minor faults of a reaped call tree). Lines are
short single `write`s to an O_APPEND file, so processes never interleave
inside a line. The host enables it before its first call; the launcher
gets the path on its command line; a call's processes inherit the
descriptor from the launcher and keep it (a plugin could write to it: a
measurement's trace only). A host that does not enable it starts its
launcher without it, so none of its calls ever holds it.
"""

from __future__ import annotations

import _thread
import fcntl
import os
import resource
import time
from collections.abc import Callable

HIGH_FD = 100

_fd = -1
_path = ""
_IGNORED: dict[str, int] = {}

# mark(label, value=0): record that this process reached `label`; `value` an
# int or a tuple of ints. Off: ignores both.
mark: Callable[..., object] = _IGNORED.get


def enable(path: str) -> None:
    """Append this process's marks (and, through the launcher, its calls') to `path`."""
    global _fd, _path, mark
    opened = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    # Above the numbers a child gives its call's descriptors, which it keeps.
    _fd = fcntl.fcntl(opened, fcntl.F_DUPFD_CLOEXEC, HIGH_FD)
    os.close(opened)
    _path = path
    mark = _record


def path() -> str:
    """The trace file, or "" when tracing is off."""
    return _path


def fd() -> int:
    """The trace file's descriptor in this process, -1 when tracing is off."""
    return _fd


def _record(label: str, value: int | tuple[int, ...] = 0) -> None:
    """Record that this process reached `label`: `mark` once tracing is on."""
    # The thread's id: a process's first thread has its pid, and the host's
    # other threads (the closer's) keep their own CPU clocks apart.
    tid = _thread.get_native_id()
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    values = " ".join(map(str, value)) if isinstance(value, tuple) else value
    line = f"{tid} {label} {time.monotonic_ns()} {time.thread_time_ns()} {faults} {values}\n"
    os.write(_fd, line.encode())
