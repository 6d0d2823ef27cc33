"""Finding, measuring and killing every process that belongs to one call (host).

A call's processes are found two ways at once:

* by uid, when the host runs as root: each call runs under its own
  unprivileged uid (`sandbox.supervisor.UidPool`), so every process with that uid is the call's,
  however it was started (double fork, `setsid`, daemonised);
* by session and ancestry otherwise: the child leads its own session and
  its descendants are found through psutil. A process that both leaves the
  session and is re-parented escapes this weaker mode (SECURITY.md says so).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

import psutil


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


def _alive(proc: psutil.Process) -> bool:
    """A process that still runs (not a zombie, not gone)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
