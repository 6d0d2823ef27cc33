"""Finding, measuring and killing every process that belongs to one call.

A call's processes are found two ways at once:

* by uid, when the host runs as root: each call runs under its own
  unprivileged uid (`UidPool`), so every process with that uid is the call's,
  however it was started (double fork, `setsid`, daemonised);
* by session and ancestry otherwise: the child leads its own session and
  its descendants are found through psutil. A process that both leaves the
  session and is re-parented escapes this weaker mode (SECURITY.md says so).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from dataclasses import dataclass

import psutil

from sandbox.outcome import HostFailure

# Per-call uids are UID_BASE .. UID_BASE + UID_SLOTS - 1: no user of the
# machine may own one. PLUGHOST_UID_BASE moves the range (the test suite uses
# its own, so it never mistakes a running server's calls for its own leaks).
UID_BASE = int(os.environ.get("PLUGHOST_UID_BASE", "1500000"))
UID_SLOTS = 1024
LOCK_DIR = "/run/plughost/uids"


@dataclass(frozen=True)
class CallProcesses:
    """How to recognise one call's processes."""

    root_pid: int
    uid: int | None
    token: str = ""  # the launcher's name for the call's child (Launcher.kill_call)

    def members(self) -> list[psutil.Process]:
        """Every live (non-zombie) process of the call."""
        found: dict[int, psutil.Process] = {}
        if self.uid is not None:
            for proc in psutil.process_iter(["uids", "status"]):
                info = proc.info
                if info["uids"] is not None and info["uids"].real == self.uid:
                    if info["status"] != psutil.STATUS_ZOMBIE:
                        found[proc.pid] = proc
            return list(found.values())
        with contextlib.suppress(psutil.Error):  # the root may be gone already
            root = psutil.Process(self.root_pid)
            found[root.pid] = root
            for proc in root.children(recursive=True):
                found[proc.pid] = proc
        for proc in psutil.process_iter(["status"]):
            try:
                if os.getsid(proc.pid) == self.root_pid:
                    found[proc.pid] = proc
            except OSError:
                continue
        return [p for p in found.values() if _alive(p)]

    def total_rss(self) -> int:
        """Sum of the resident memory of every process of the call, in bytes."""
        total = 0
        for proc in self.members():
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total

    def kill_all(self, deadline_s: float = 2.0) -> int:
        """SIGKILL every process of the call until none is left; return how many.

        Processes stopped with SIGSTOP die too (SIGKILL needs no continue) and
        are also sent SIGCONT so a tracer cannot hold them. The sweep repeats
        because a process may fork between one scan and its kill; the call's
        process cap bounds how often that can happen.
        """
        killed = 0
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            procs = self.members()
            if not procs:
                break
            for proc in procs:
                try:
                    proc.send_signal(signal.SIGKILL)
                    proc.send_signal(signal.SIGCONT)
                    killed += 1
                except psutil.Error:
                    continue
        return killed


class UidPool:
    """Hands out one unprivileged uid per running call.

    A uid is held with an exclusive `flock` on a file in LOCK_DIR, so two
    hosts on one machine never share one; the lock dies with its holder.
    """

    def __init__(self, base: int = UID_BASE, slots: int = UID_SLOTS) -> None:
        self._base = base
        self._slots = slots
        self.used: set[int] = set()  # every uid this pool has handed out
        os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)

    def acquire(self) -> tuple[int, int]:
        """Lock a free uid. Returns `(uid, lock_fd)`. Raises RuntimeError when all are taken."""
        for uid in range(self._base, self._base + self._slots):
            fd = os.open(f"{LOCK_DIR}/{uid}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.used.add(uid)
            return uid, fd
        raise HostFailure(f"all {self._slots} sandbox uids are in use")

    def at_rest(self) -> set[int]:
        """Uids this pool has handed out that no call holds now, of this host
        or another: a process running under one is a leftover of this host's."""
        free = set()
        for uid in sorted(self.used):
            fd = os.open(f"{LOCK_DIR}/{uid}", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                free.add(uid)
            except BlockingIOError:
                continue
            finally:
                os.close(fd)
        return free

    @staticmethod
    def release(lock_fd: int) -> None:
        """Give the uid back (its processes must be dead by now)."""
        os.close(lock_fd)


def _alive(proc: psutil.Process) -> bool:
    """A process that still runs (not a zombie, not gone)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
