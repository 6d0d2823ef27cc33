"""cgroup v2, the unified hierarchy: where a host creates its calls' cgroups
and how it prepares that place (the cgroups themselves: `sandbox.cgroups`).
Runs in the host, once, when a Sandbox resolves its layers.

    root host            /sys/fs/cgroup/plughost/call-<host id>-<call id>
    unprivileged host    <its own cgroup>/call-<host id>-<call id>
      with a delegated   <its own cgroup>/host   <- the host's processes, moved
      cgroup             (systemd `Delegate=yes`: the service's cgroup is its own)

A v2 cgroup that hands controllers to its children may hold no process
itself, hence the move of a delegated host into a leaf of its own. Both
places get the memory and pids controllers enabled for their children. A
machine whose memory controller is bound to v1 (as this one, a hybrid
layout) keeps the v1 cgroups.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
CONTROLLERS = ("memory", "pids")
HOST_LEAF = "host"


def find_base(
    root: Path = ROOT, self_cgroup: Path = SELF_CGROUP, euid: int | None = None
) -> tuple[Path, bool] | None:
    """Where this host's call cgroups go, and whether it is a delegated
    cgroup (True) rather than a directory of the root's (False); None when
    v2 with memory and pids is not there or not ours to use."""
    controllers = root / "cgroup.controllers"
    try:
        available = set(controllers.read_text().split())
    except OSError:
        return None  # no unified hierarchy mounted at the root
    if not set(CONTROLLERS) <= available:
        return None
    if (os.geteuid() if euid is None else euid) == 0:
        return root / "plughost", False
    own = _own_cgroup(root, self_cgroup)
    if own is None or own == root:
        return None
    if not all(os.access(own / f, os.W_OK) for f in ("cgroup.procs", "cgroup.subtree_control")):
        return None  # not delegated to this user
    return own, True


def _own_cgroup(root: Path, self_cgroup: Path) -> Path | None:
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return root / line[3:].strip().lstrip("/")
    return None


def prepare(base: Path, delegated: bool) -> None:
    """Make `base` a cgroup whose children get memory and pids. Raises OSError."""
    if delegated:
        leaf = base / HOST_LEAF
        leaf.mkdir(exist_ok=True)
        for pid in (base / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                (leaf / "cgroup.procs").write_text(pid)
    else:
        _enable(base.parent)
        base.mkdir(exist_ok=True)
    _enable(base)


def _enable(directory: Path) -> None:
    control = directory / "cgroup.subtree_control"
    try:
        enabled = set(control.read_text().split())
    except FileNotFoundError:  # a cgroup the kernel has not filled in (a test's tree)
        enabled = set()
    missing = [c for c in CONTROLLERS if c not in enabled]
    if missing:
        control.write_text(" ".join(f"+{c}" for c in missing))


def usable() -> Path | None:
    """Find and prepare this host's v2 place; None where there is none."""
    found = find_base()
    if found is None:
        return None
    base, delegated = found
    try:
        prepare(base, delegated)
        probe = base / f"probe-{os.getpid()}"
        probe.mkdir()
        limits_there = (probe / "memory.max").exists() and (probe / "pids.max").exists()
        probe.rmdir()
    except OSError:
        return None
    return base if limits_there else None
