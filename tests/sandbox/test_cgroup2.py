"""cgroup v2: the decisions, against a directory tree shaped like the unified
hierarchy (every machine), and a real call where a v2 memory controller is
mounted (not on a machine whose memory controller is bound to v1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from host.registry import PluginRegistry
from sandbox import cgroup2
from sandbox.cgroups import CallCgroup, sweep_stale
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner
from tests.conftest import write_plugin

LAYERS = {"cgroup_memory": True, "cgroup_pids": True}


def v2_tree(root: Path, controllers: str = "cpuset cpu io memory pids") -> Path:
    """A unified hierarchy as the kernel shows it, with a service's cgroup."""
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("\n")
    service = root / "system.slice" / "plughost.service"
    service.mkdir(parents=True)
    (service / "cgroup.procs").write_text(f"{os.getpid()}\n")
    (service / "cgroup.subtree_control").write_text("\n")
    return service


def self_cgroup(tmp_path: Path, path: str) -> Path:
    file = tmp_path / "self-cgroup"
    file.write_text(f"0::{path}\n")
    return file


def test_a_root_host_puts_call_cgroups_below_the_root(tmp_path: Path) -> None:
    v2_tree(tmp_path)
    found = cgroup2.find_base(tmp_path, self_cgroup(tmp_path, "/"), euid=0)
    assert found == (tmp_path / "plughost", False)
    cgroup2.prepare(*found)
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert (tmp_path / "plughost" / "cgroup.subtree_control").read_text() == "+memory +pids"


def test_a_delegated_host_moves_itself_to_a_leaf_and_hands_controllers_down(
    tmp_path: Path,
) -> None:
    service = v2_tree(tmp_path)
    found = cgroup2.find_base(
        tmp_path, self_cgroup(tmp_path, "/system.slice/plughost.service"), euid=1000
    )
    assert found == (service, True)
    cgroup2.prepare(*found)
    assert (service / "host" / "cgroup.procs").read_text() == str(os.getpid())
    assert (service / "cgroup.subtree_control").read_text() == "+memory +pids"


def test_controllers_already_enabled_are_left_alone(tmp_path: Path) -> None:
    service = v2_tree(tmp_path)
    (service / "cgroup.subtree_control").write_text("memory pids\n")
    cgroup2.prepare(service, delegated=True)
    assert (service / "cgroup.subtree_control").read_text() == "memory pids\n"


@pytest.mark.parametrize(
    ("controllers", "own", "euid", "why"),
    [
        ("cpu io pids", "/system.slice/plughost.service", 0, "no memory controller in v2"),
        ("cpu memory pids", "/", 1000, "an unprivileged host in the root cgroup"),
        (None, "/", 0, "no unified hierarchy (v1 only)"),
    ],
)
def test_no_v2_place_where_it_cannot_be_used(
    tmp_path: Path, controllers: str | None, own: str, euid: int, why: str
) -> None:
    if controllers is not None:
        v2_tree(tmp_path, controllers)
    assert cgroup2.find_base(tmp_path, self_cgroup(tmp_path, own), euid=euid) is None, why


def test_a_call_cgroup_gets_its_limits_and_reads_the_v2_files(tmp_path: Path) -> None:
    base = tmp_path / "plughost"
    base.mkdir()
    cgroup = CallCgroup("call-h0123456789ab-c1", 64 << 20, 18, LAYERS, v2_base=base)
    path = base / "call-h0123456789ab-c1"
    path.mkdir()
    (path / "memory.swap.max").write_text("max")  # the kernel makes these files
    assert cgroup.create() == [str(path / "cgroup.procs")]
    assert (path / "memory.max").read_text() == str(64 << 20)
    assert (path / "memory.swap.max").read_text() == "0"
    assert (path / "pids.max").read_text() == "18"
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
    assert cgroup.oom_killed() is False
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\n")
    assert cgroup.oom_killed() is True
    (path / "memory.stat").write_text("anon 4096\nfile 999999\nshmem 1024\n")
    assert cgroup.usage_bytes() == 5120  # page cache ("file") not counted
    (path / "memory.peak").write_text("7340032\n")
    assert cgroup.peak_bytes() == 7340032


def test_sweep_looks_for_stale_call_cgroups_in_the_v2_place(tmp_path: Path) -> None:
    base = tmp_path / "plughost"
    stale = base / "call-h0000000000aa-c1"  # a host id whose lock nobody holds
    stale.mkdir(parents=True)
    assert sweep_stale(LAYERS, base) == 1
    assert not stale.exists()


V2_MEMORY = cgroup2.find_base() is not None


@pytest.mark.skipif(
    not V2_MEMORY,
    reason="no cgroup v2 memory controller here (v1 or hybrid layout): "
    "the v2 cgroups of a real call cannot be run",
)
def test_real_v2_cgroup_stops_memory_spread_over_processes(
    registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    body = """
import os
children = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = bytearray(60 * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(10)
        os._exit(0)
    children.append(pid)
time.sleep(10)
return {}
"""
    write_plugin(tmp_path, "spread", body, memory_mb=128)
    assert registry.load_directory(tmp_path / "spread") == ["spread"]
    sandbox = Sandbox()
    try:
        assert sandbox.active_layers()["cgroup_memory"]
        result, error = ToolRunner(registry, sandbox).run("spread", payload)
    finally:
        sandbox.close()
    assert result == {} and error["error"]["details"]["reason"] == "memory_limit"


def test_a_host_without_cgroups_never_judges_other_hosts_locks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An unprivileged host may share the lock directory (a root server that
    # gave up root hands it to its user); other hosts' locks are not its own.
    from sandbox import cgroups

    def judged(ident: str) -> int | None:
        raise AssertionError(f"judged host {ident}")

    monkeypatch.setattr(cgroups, "_lock_of_dead_host", judged)
    assert sweep_stale({"cgroup_memory": False, "cgroup_pids": False}) == 0


def test_a_lock_this_user_cannot_open_belongs_to_a_live_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sandbox import cgroups

    def denied(*args: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cgroups.os, "open", denied)
    assert cgroups._lock_of_dead_host("h0123456789ab") is None
