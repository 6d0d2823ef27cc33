"""The isolation layers, one module each, and the one registry of their names.

Like nsjail's one file per concern, each layer lives in its own module and
says there what it needs, how it is detected, what the host prepares and
what the child applies. `LAYERS` lists them; every list of layer names
(`OPTIONAL_LAYERS`, the protections a host reports, `--disable-layer`)
derives from it. The child applies them in the order of `sandbox.child.STEPS`.

Each `Layer` below is the one statement of its facts: docs/architecture.md's
table of layers is generated from these strings (`python
scripts/scan_governance.py --write-layer-table`), and the governance scanner
fails when the two differ. How a root launcher gives a call its IPC, UTS,
PID and network namespaces and its root is `shared.py`'s.

Detection runs once per Sandbox, in a fresh interpreter (`detect`), so the
multi-threaded host never forks itself; `resolve` turns what was found, the
layers switched off and the host's privilege into the layers calls get.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sandbox.layers import cgroup, ipc, landlock, mnt, net, pid, seccomp, user, uts
from sandbox.layers.cgroup import CGROUP_V1
from sandbox.layers.kernel import fork_probe, libc


@dataclass(frozen=True)
class Layer:
    """One isolation layer as the registry knows it."""

    name: str
    needs: str  # what it cannot work without
    detected: str  # how a host finds out it has it
    host: str  # what the host prepares for it per call
    child: str  # what the child applies, with its step of `sandbox.child.STEPS`
    module: str = "-"  # the module of sandbox/layers/ that holds it
    isolated: bool = False  # needs root or a user namespace
    optional: bool = True  # False: part of every call, never missing
    unshare_flag: int = 0  # a namespace the child creates in the minimal root's unshare
    probe: Callable[[dict[str, bool]], bool] | None = None  # run in the probe process


def _unshare_probe(flag: int) -> Callable[[dict[str, bool]], bool]:
    def probe(found: dict[str, bool]) -> bool:
        root, in_user_namespace = found["privilege_drop"], found["user_namespace"]
        return (root or in_user_namespace) and _can_unshare(flag, in_user_namespace)

    return probe


def _can_unshare(flags: int, user_namespace: bool = False) -> bool:
    """Whether a child can unshare `flags` (from a user namespace of its own first)."""

    def attempt() -> bool:
        if user_namespace:
            user.enter_user_namespace(os.getuid(), os.getgid())
        return bool(libc.unshare(flags) == 0)

    return fork_probe(attempt)


LAYERS: tuple[Layer, ...] = (
    Layer(
        "privilege_drop",
        "root",
        "euid 0",
        "a uid per call (`UidPool`)",
        "setresuid to it (`privilege`)",
        module="privilege",
        probe=lambda found: os.geteuid() == 0,
    ),
    Layer(
        "user_namespace",
        "an unprivileged host",
        "a forked probe unshares CLONE_NEWUSER",
        "-",
        "CLONE_NEWUSER (`user`), capabilities dropped (`privilege`)",
        module="user",
        probe=lambda found: os.geteuid() != 0 and _can_unshare(0, user_namespace=True),
    ),
    Layer(
        "no_new_privs",
        "Linux 3.5",
        "always",
        "-",
        "PR_SET_NO_NEW_PRIVS (`no_new_privs`)",
        module="privilege",
        probe=lambda found: True,
    ),
    Layer(
        "mount_namespace",
        "root or user_namespace",
        "a forked probe unshares CLONE_NEWNS",
        "a root launcher's minimal-root template per plugin (`shared.py`)",
        "one unshare (of the namespaces the launcher did not give) and the minimal root"
        " (`mnt`), pivot_root (`pid`)",
        module="mnt",
        isolated=True,
        probe=_unshare_probe(mnt.CLONE_NEWNS),
    ),
    Layer(
        "tmpfs_scratch",
        "mount_namespace",
        "with mount_namespace",
        "-",
        "a tmpfs scratch of scratch_mb and a /dev/shm of the memory limit (`mnt`)",
        module="mnt",
        isolated=True,
        probe=lambda found: found["mount_namespace"],
    ),
    Layer(
        "network_namespace",
        "root or user_namespace",
        "a forked probe unshares CLONE_NEWNET",
        "a root launcher's per-uid slot (`shared.py`; never two running calls: SECURITY.md)",
        "else the flag in `mnt`'s unshare; loopback up (`net`)",
        module="net",
        isolated=True,
        probe=_unshare_probe(net.CLONE_NEWNET),
        unshare_flag=net.CLONE_NEWNET,
    ),
    Layer(
        "ipc_namespace",
        "root or user_namespace",
        "a forked probe unshares CLONE_NEWIPC",
        "a root launcher's shared one (`shared.py`)",
        "else the flag in `mnt`'s unshare",
        module="ipc",
        isolated=True,
        probe=_unshare_probe(ipc.CLONE_NEWIPC),
        unshare_flag=ipc.CLONE_NEWIPC,
    ),
    Layer(
        "uts_namespace",
        "root or user_namespace",
        "a forked probe unshares CLONE_NEWUTS",
        "a root launcher's shared one (`shared.py`)",
        "else the flag in `mnt`'s unshare",
        module="uts",
        isolated=True,
        probe=_unshare_probe(uts.CLONE_NEWUTS),
        unshare_flag=uts.CLONE_NEWUTS,
    ),
    Layer(
        "pid_namespace",
        "root or user_namespace",
        "a forked probe unshares CLONE_NEWPID",
        "a root launcher's slot, or one it makes per call (`shared.py`)",
        "in a slot: /proc with hidepid (`pid`); else init (pid 1), worker; behind a relay"
        " when the child makes it",
        module="pid",
        isolated=True,
        probe=_unshare_probe(pid.CLONE_NEWPID),
        unshare_flag=pid.CLONE_NEWPID,
    ),
    Layer(
        "landlock",
        "Landlock ABI 1+",
        "landlock_create_ruleset reports an ABI",
        "the launcher works each plugin's rules out once (`rules_for`)",
        "the ruleset: exposed paths read-only, scratch and /dev/shm writable (`landlock`)",
        module="landlock",
        probe=lambda found: landlock.landlock_abi() >= 1,
    ),
    Layer(
        "seccomp",
        "x86_64 seccomp filters",
        "a forked probe installs the filter",
        "the launcher builds each variant's program once (`prepare_filters`)",
        "the BPF system-call filter (`seccomp`)",
        module="seccomp",
        probe=lambda found: seccomp.probe(),
    ),
    Layer(
        "cgroup_memory",
        "root or a delegated v2 cgroup",
        "v1 probe, else `cgroup2.usable()`",
        "`CallCgroup` with the call's memory limit",
        "join cgroup.procs (`cgroup`)",
        module="cgroup",
        probe=lambda found: found["privilege_drop"] and cgroup.probe(CGROUP_V1["cgroup_memory"]),
    ),
    Layer(
        "cgroup_pids",
        "root or a delegated v2 cgroup",
        "v1 probe, else `cgroup2.usable()`",
        "`CallCgroup` with pids.max",
        "join cgroup.procs (`cgroup`)",
        module="cgroup",
        probe=lambda found: found["privilege_drop"] and cgroup.probe(CGROUP_V1["cgroup_pids"]),
    ),
    Layer(
        "fresh_process_per_call",
        "-",
        "always",
        "the launcher forks one child per call",
        "-",
        optional=False,
    ),
    Layer("rlimits", "-", "always", "-", "setrlimit (`rlimits`, `rlimits_for`)", optional=False),
    Layer("own_session", "-", "always", "-", "setsid (`descriptors`)", optional=False),
    Layer(
        "scrubbed_environment", "-", "always", "-", "SAFE_ENV only (`environment`)", optional=False
    ),
    Layer(
        "memory_watchdog", "-", "always", "the watch samples the call's memory", "-", optional=False
    ),
)
BY_NAME = {layer.name: layer for layer in LAYERS}
# Layers applied when this machine offers them.
OPTIONAL_LAYERS = tuple(layer.name for layer in LAYERS if layer.optional)
ALWAYS_ON = tuple(layer.name for layer in LAYERS if not layer.optional)
# The namespaces need root or a user namespace: without either there is no
# per-call uid, minimal root or tmpfs scratch. A root host does not use a
# user namespace (its calls get host uids of their own; SECURITY.md says why).
DEPENDS_ON_PRIVILEGE_DROP = tuple(layer.name for layer in LAYERS if layer.isolated)
CGROUP_LAYERS = ("cgroup_memory", "cgroup_pids")
# Namespaces created in the same unshare as the minimal root, with their flags.
UNSHARE_FLAGS = {layer.name: layer.unshare_flag for layer in LAYERS if layer.unshare_flag}


def _detect_here() -> dict[str, bool]:
    found: dict[str, bool] = {}
    for layer in LAYERS:
        if layer.probe is not None:
            found[layer.name] = bool(layer.probe(found))
    return found


def detect() -> dict[str, bool]:
    """Which layers this machine offers, probed in a fresh process (never forks the caller)."""
    # Imported here, in the host: subprocess brings threading, whose at-fork
    # handler would run in (and cost) every child the launcher forks.
    import subprocess

    code = "import json; from sandbox.layers import _detect_here; print(json.dumps(_detect_here()))"
    root = str(Path(__file__).resolve().parent.parent.parent)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": root}
    try:
        out = subprocess.run(
            [sys.executable, "-E", "-c", f"import sys; sys.path.insert(0, {root!r}); {code}"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=True,
        ).stdout
        found: dict[str, bool] = json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return {}
    return found


def resolve(found: dict[str, bool], disabled: Iterable[str], cgroup_v2: bool) -> dict[str, bool]:
    """The optional layers calls get: what was `found`, minus `disabled`, with
    per-call cgroups in the unified hierarchy where v1 has none (`cgroup_v2`:
    the host has a usable v2 place), and the namespaces only where the host
    is root or has user namespaces."""
    off = frozenset(disabled)
    layers = {name: bool(found.get(name)) and name not in off for name in OPTIONAL_LAYERS}
    if not any(found.get(name) for name in CGROUP_LAYERS):
        for name in CGROUP_LAYERS:
            layers[name] = cgroup_v2 and name not in off
    if layers["privilege_drop"]:
        layers["user_namespace"] = False  # not needed, so never missing
    elif not layers["user_namespace"]:
        for name in DEPENDS_ON_PRIVILEGE_DROP:
            layers[name] = False
    return layers


def missing(layers: dict[str, bool]) -> list[str]:
    """Layers calls lack here; a root host's unused user namespace is not one."""
    return [
        name
        for name, on in layers.items()
        if not on and not (name == "user_namespace" and layers["privilege_drop"])
    ]


def _layers_are(names: list[str]) -> str:
    return f"layer {names[0]} is" if len(names) == 1 else f"layers {', '.join(names)} are"


def shortfall(layers: dict[str, bool], disabled: Iterable[str]) -> tuple[list[str], list[str]]:
    """What to tell the operator of the layers calls lack (`missing`), as
    (notes, warnings): one line per cause, naming what would add them.

    privilege_drop on an unprivileged host whose calls get a user namespace
    in its place is a note: that kind of host never has it."""
    off = frozenset(disabled)
    lacking = missing(layers)
    notes: list[str] = []
    if "privilege_drop" in lacking and "privilege_drop" not in off and layers["user_namespace"]:
        lacking.remove("privilege_drop")
        notes.append(
            "isolation layer privilege_drop needs a host started as root; calls of this"
            " unprivileged host get user_namespace in its place"
        )
    switched = [name for name in lacking if name in off]
    cgroups = [name for name in lacking if name in CGROUP_LAYERS and name not in off]
    others = [name for name in lacking if name not in off and name not in CGROUP_LAYERS]
    warnings = []
    if switched:
        warnings.append(
            f"isolation {_layers_are(switched)} switched off; calls run without"
            f" {'it' if len(switched) == 1 else 'them'}"
        )
    if cgroups:
        warnings.append(
            f"isolation {_layers_are(cgroups)} not available here: the host has no cgroup it"
            " may create call cgroups in; calls run without them (the memory watchdog still"
            " samples each call). Run it as a systemd service with Delegate=yes"
            " (docs/deploy.md), or as root"
        )
    if others:
        warnings.append(
            f"isolation {_layers_are(others)} not available here; calls run without"
            f" {'it' if len(others) == 1 else 'them'} (docs/deploy.md says what each needs)"
        )
    return notes, warnings


def protections(layers: dict[str, bool]) -> dict[str, bool]:
    """Which isolation layers calls actually get (a root host's user
    namespace, which it does not need, is left out)."""
    lacking = missing(layers)
    return {
        **dict.fromkeys(ALWAYS_ON, True),
        **{name: on for name, on in layers.items() if on or name in lacking},
    }


__all__ = [
    "ALWAYS_ON",
    "CGROUP_V1",
    "LAYERS",
    "OPTIONAL_LAYERS",
    "Layer",
    "detect",
    "missing",
    "protections",
    "shortfall",
    "resolve",
]
