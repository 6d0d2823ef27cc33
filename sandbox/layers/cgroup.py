"""Layers cgroup_memory and cgroup_pids: one cgroup per call.

Detected: v1 hierarchies the host may create directories in (root), or a
usable v2 place (`sandbox.cgroup2.usable`, chosen when the Sandbox resolves
its layers). Host: `sandbox.cgroups.CallCgroup` creates the call's cgroup
with its limits before the fork and removes it after. Child: `join` writes
its pid into the cgroups first of all, before anything else runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CGROUP_V1 = {"cgroup_memory": "/sys/fs/cgroup/memory", "cgroup_pids": "/sys/fs/cgroup/pids"}


def probe(root: str) -> bool:
    """Whether this process may make call cgroups below the v1 `root`."""
    base = Path(root) / "plughost"
    try:
        base.mkdir(exist_ok=True)
        probe = base / f"probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
        return True
    except OSError:
        return False


def join(procs_files: Iterable[str]) -> None:
    """Move this process into the call's cgroups (their cgroup.procs files;
    "0" names the writer)."""
    for procs_file in procs_files:
        fd = os.open(procs_file, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
