"""What an escape case needs to prove that what it reached is the host's.

A name is not an identity. A call's minimal root has directories of its own
on the way to what it may use (a `/home` when the interpreter's venv is
under `/home`), and a host running in a container's PID namespace has a
small pid that the call's own PID namespace has too. A case that trusted
the name would report an escape that did not happen, and a suite that
cries wolf gets switched off. So the runner hands every case evidence it
can check, and a case reports an escape only when what it reached matches:

    host_files      path -> [st_dev, st_ino] of host paths the cases look
                    for (a planted marker, /etc/passwd, /etc/shadow, /home,
                    the host's working directory, the case's own directory,
                    the world-writable directories, ...)
    marker_path     a file planted on the host for the run, holding
    marker_nonce    a nonce nothing in a sandbox can know
    root_only_path  (root host) the same, readable by root alone
    host_pid        the host's pid in its own PID namespace, and its start
    host_start      time (field 22 of /proc/<pid>/stat): a process of that
                    pid with another start time is not the host
    host_paths      host paths a command line of the host would name
    host_mounts     "major:minor root mount-point" of the host's mounts
    listener_nonce  what the suite's TCP and unix listeners send on accept
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import sandbox

# Host paths whose identity the cases compare against (those that exist here).
HOST_PATHS = (
    "/",
    "/etc/passwd",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/shadow",
    "/var/log",
    "/home",
    "/root",
    "/tmp",
    "/var/tmp",
    "/dev/shm",
)
MAX_MOUNTS = 2000  # the request's options are bounded in items (10,000 by default)


def identity(path: str | Path) -> list[int] | None:
    """`[st_dev, st_ino]` of `path` (links followed), or None when it is not there."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_dev, info.st_ino]


def start_time(pid: int | str = "self") -> int:
    """Field 22 of /proc/<pid>/stat: when the process started, in clock
    ticks after boot. The pid and this together name one process."""
    with open(f"/proc/{pid}/stat") as stream:
        after_name = stream.read().rsplit(")", 1)[1].split()
    return int(after_name[19])  # field 3 is the first after the name


def host_mounts() -> list[str]:
    """The host's mounts as "major:minor root mount-point" (mountinfo fields 3-5)."""
    try:
        with open("/proc/self/mountinfo") as stream:
            lines = stream.read().splitlines()
    except OSError:
        return []
    return [" ".join(line.split()[2:5]) for line in lines[:MAX_MOUNTS]]


def _deep(path: str) -> bool:
    """A path specific enough that finding it in a command line means this
    host's (not `/`, `/usr` or `/tmp`, which every system has)."""
    return len(Path(path).parts) > 2


class Evidence:
    """The marker files planted for one run in `directory` (which the caller
    made, outside every sandbox's view) and the host's identities."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.nonce = secrets.token_hex(16)
        self.marker = os.path.join(directory, "marker")
        _plant(self.marker, self.nonce, 0o644)
        self.root_only: str | None = None
        if os.geteuid() == 0:
            self.root_only = os.path.join(directory, "root-only")
            _plant(self.root_only, self.nonce, 0o600)
        cwd = os.getcwd()
        paths = [*HOST_PATHS, self.marker, cwd, *([self.root_only] if self.root_only else [])]
        self.files = {path: found for path in paths if (found := identity(path)) is not None}
        checkout = str(Path(sandbox.__file__).resolve().parent.parent)
        self.paths = sorted(
            {p for p in (sys.executable, sys.prefix, checkout, cwd) if _deep(p)}, key=len
        )
        self.pid = os.getpid()
        self.start = start_time()
        self.mounts = host_mounts()

    def options_for(self, case_directory: Path, listener_nonce: str) -> dict[str, Any]:
        """The evidence options of one case (whose plugin directory is
        `case_directory`: a write there would land in the host's tree)."""
        files = dict(self.files)
        if (found := identity(case_directory)) is not None:
            files[str(case_directory)] = found
        return {
            "host_files": files,
            "marker_path": self.marker,
            "marker_nonce": self.nonce,
            "root_only_path": self.root_only,
            "host_pid": self.pid,
            "host_start": self.start,
            "host_paths": self.paths,
            "host_mounts": self.mounts,
            "listener_nonce": listener_nonce,
        }

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _plant(path: str, content: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as stream:
        stream.write(content)
    os.chmod(path, mode)  # whatever the umask
