"""One cgroup per call (cgroup v1 memory and pids controllers, as this
machine offers), a stronger alternative to rlimits: the memory limit covers
the whole process tree and the tmpfs pages it writes, and the pids limit
holds for root as well. Created before the call, removed after it.

cgroup v2 is not handled yet: where only v2 is mounted, detection reports
the layers as missing and the call runs with rlimits and the watchdog.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from sandbox.layers import CGROUP_V1


def sweep_stale(layers: dict[str, bool]) -> int:
    """Remove the call cgroups of hosts that no longer run; return how many.

    A host killed outright cannot remove its calls' cgroups; their processes
    died with its launcher, so the directories are empty and can go.
    """
    removed = 0
    for name, root in CGROUP_V1.items():
        if not layers.get(name):
            continue
        for path in (Path(root) / "plughost").glob("call-*"):
            if _host_alive(path.name):
                continue  # that host still runs: its cgroups are its own business
            with contextlib.suppress(OSError):
                path.rmdir()
                removed += 1
    return removed


def _host_alive(name: str) -> bool:
    """Whether the host named in `call-<host pid>-<id>` still runs (unknown: yes)."""
    try:
        os.kill(int(name.split("-")[1]), 0)
    except ProcessLookupError:
        return False
    except (ValueError, IndexError, PermissionError):
        return True
    return True


class CallCgroup:
    """The cgroups of one call, named after it."""

    def __init__(
        self, name: str, memory_bytes: int, max_processes: int, layers: dict[str, bool]
    ) -> None:
        self.dirs: dict[str, Path] = {}
        if layers.get("cgroup_memory"):
            self.dirs["memory"] = Path(CGROUP_V1["cgroup_memory"]) / "plughost" / name
        if layers.get("cgroup_pids"):
            self.dirs["pids"] = Path(CGROUP_V1["cgroup_pids"]) / "plughost" / name
        self.memory_bytes = memory_bytes
        self.max_processes = max_processes

    def create(self) -> list[str]:
        """Create the cgroups; return the `cgroup.procs` files the child joins.

        Raises OSError if a controller refuses (the call then does not run).
        """
        for kind, path in self.dirs.items():
            path.parent.mkdir(exist_ok=True)
            path.mkdir(exist_ok=True)
            if kind == "memory":
                (path / "memory.limit_in_bytes").write_text(str(self.memory_bytes))
                swap = path / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    swap.write_text(str(self.memory_bytes))
            else:
                (path / "pids.max").write_text(str(self.max_processes))
        return [str(path / "cgroup.procs") for path in self.dirs.values()]

    def oom_killed(self) -> bool:
        """True if the kernel killed a process of the call for the memory limit."""
        path = self.dirs.get("memory")
        if path is None:
            return False
        try:
            for line in (path / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            return False
        return False

    def usage_bytes(self) -> int | None:
        """Anonymous and tmpfs memory of the whole call now, None without a memory cgroup."""
        path = self.dirs.get("memory")
        if path is None:
            return None
        try:
            stat = dict(line.split() for line in (path / "memory.stat").read_text().splitlines())
            return int(stat.get("total_rss", 0)) + int(stat.get("total_shmem", 0))
        except (OSError, ValueError):
            return None

    def remove(self, deadline_s: float = 2.0) -> None:
        """Remove the cgroups once their processes are gone (they are killed first)."""
        end = time.monotonic() + deadline_s
        for path in self.dirs.values():
            while path.exists():
                try:
                    path.rmdir()
                except OSError:
                    if time.monotonic() > end:
                        break
                    # Processes still exiting: kill what is left and retry.
                    with contextlib.suppress(OSError, ValueError):
                        for pid in (path / "cgroup.procs").read_text().split():
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(int(pid), 9)
                    time.sleep(0.005)
