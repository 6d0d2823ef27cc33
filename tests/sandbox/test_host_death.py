"""Children die with the host: nothing a plugin started outlives a host killed
with SIGKILL in the middle of a call."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from sandbox.supervisor import uid_range
from tests.conftest import write_plugin

pytestmark = pytest.mark.no_leak_check  # the host under test is another process


def _running(pred) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["uids", "cmdline", "status"]):
        # A zombie holds no memory or descriptors; this machine's init does not
        # reap orphans, so zombies of a dead host are not counted here.
        if proc.info["status"] != psutil.STATUS_ZOMBIE and pred(proc):
            found.append(proc)
    return found


def test_sandbox_and_launcher_die_when_the_host_is_killed(tmp_path: Path) -> None:
    write_plugin(
        tmp_path,
        "sleeper",
        "import subprocess\nsubprocess.Popen(['sleep', '300'])\ntime.sleep(300)",
        timeout_s=30,
    )
    script = textwrap.dedent(
        f"""
        from host.registry import PluginRegistry
        from sandbox.supervisor import Sandbox
        from sandbox.tool_runner import ToolRunner
        registry = PluginRegistry()
        registry.load_directory({str(tmp_path)!r})
        runner = ToolRunner(registry, Sandbox())
        print(runner.run("sleeper", {{"image": b"x", "mime_type": "image/png"}}))
        """
    )
    host = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    try:

        def ours(proc: psutil.Process) -> bool:
            uid = proc.info["uids"].real if proc.info["uids"] else -1
            if uid not in uid_range():
                return False
            try:
                return any(p.pid == host.pid for p in proc.parents())
            except psutil.Error:
                return False

        deadline = time.monotonic() + 15
        while len(_running(ours)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        sandboxed = _running(ours)
        assert len(sandboxed) >= 2, "the plugin and its child did not start"
        launcher = psutil.Process(host.pid).children()[0]
        os.kill(host.pid, signal.SIGKILL)
        host.wait(10)
        gone, alive = psutil.wait_procs([*sandboxed, launcher], timeout=5)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert alive == []
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(10)


@pytest.mark.no_leak_check
def test_launcher_death_fails_calls_in_flight_clearly_and_is_recovered(
    runner, payload: dict, registry
) -> None:
    import threading

    runner.run("image_info", payload)  # make sure the launcher runs
    launcher = runner.sandbox.launcher.pid
    outcome: dict = {}
    call = threading.Thread(
        target=lambda: outcome.update(error=runner.run("sleep_forever", payload)[1])
    )
    started = time.monotonic()
    call.start()
    time.sleep(0.3)
    os.kill(launcher, signal.SIGKILL)
    call.join(10)
    error = outcome["error"]["error"]
    assert error["type"] == "InternalError" and error["details"]["stage"] == "launcher"
    assert time.monotonic() - started < 0.9  # not the plugin's 1 s timeout
    result, error = runner.run("image_info", payload)
    assert error == {} and runner.sandbox.launcher.pid != launcher


@pytest.mark.skipif(
    not Path("/sys/fs/cgroup/memory").is_dir(), reason="no cgroup v1 memory controller"
)
def test_next_host_removes_the_cgroups_a_killed_host_left(tmp_path: Path) -> None:
    from sandbox.supervisor import Sandbox

    write_plugin(tmp_path, "sleeper2", "time.sleep(300)", timeout_s=30)
    script = (
        "from host.registry import PluginRegistry\n"
        "from sandbox.cgroups import host_id\n"
        "from sandbox.supervisor import Sandbox\n"
        "from sandbox.tool_runner import ToolRunner\n"
        "print(host_id(), flush=True)\n"
        "registry = PluginRegistry()\n"
        f"registry.load_directory({str(tmp_path)!r})\n"
        "runner = ToolRunner(registry, Sandbox())\n"
        "runner.run('sleeper2', {'image': b'x', 'mime_type': 'image/png'})\n"
    )
    host = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert host.stdout is not None
    pattern = f"call-{host.stdout.readline().strip()}-*"
    host.stdout.close()
    deadline = time.monotonic() + 15
    while (
        not list(Path("/sys/fs/cgroup/memory/plughost").glob(pattern))
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    os.kill(host.pid, signal.SIGKILL)
    host.wait(10)
    time.sleep(0.5)  # the launcher notices and kills the call
    assert list(
        Path("/sys/fs/cgroup/memory/plughost").glob(pattern)
    )  # a killed host cannot clean up
    sandbox = Sandbox()
    try:
        sandbox.active_layers()
        assert not list(Path("/sys/fs/cgroup/memory/plughost").glob(pattern))
        assert not list(Path("/sys/fs/cgroup/pids/plughost").glob(pattern))
    finally:
        sandbox.close()


HOLD_CGROUPS = """
import sys
from sandbox.cgroups import CallCgroup, host_id
cgroup = CallCgroup(
    f"call-{host_id()}-held", 64 << 20, 16, {"cgroup_memory": True, "cgroup_pids": True}
)
cgroup.create()  # empty, as between creation and the child joining it
print(host_id(), flush=True)
sys.stdin.readline()
"""


@pytest.mark.skipif(
    not Path("/sys/fs/cgroup/memory").is_dir() or not Path("/sys/fs/cgroup/pids").is_dir(),
    reason="no cgroup v1 memory and pids controllers",
)
def test_sweep_tells_a_live_host_in_another_pid_namespace_from_a_dead_one() -> None:
    from sandbox.cgroups import HOSTS_DIR, sweep_stale
    from sandbox.layers import CGROUP_V1

    # The other host is pid 1 of its own PID namespace: its pid says nothing
    # here (pid 1 is this machine's init, alive whatever the other host does).
    other = subprocess.Popen(
        ["unshare", "--pid", "--kill-child", sys.executable, "-c", HOLD_CGROUPS],
        cwd=Path(__file__).parents[2],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    layers = {name: True for name in CGROUP_V1}
    ident = ""
    try:
        assert other.stdout is not None
        ident = other.stdout.readline().strip()
        held = [Path(root) / "plughost" / f"call-{ident}-held" for root in CGROUP_V1.values()]
        assert ident and all(path.is_dir() for path in held)
        sweep_stale(layers)  # this test process is another host
        assert all(path.is_dir() for path in held), "a live host's cgroups were removed"
        other.kill()  # unshare, and with it the host in the namespace
        other.wait(10)
        deadline = time.monotonic() + 5
        while any(path.is_dir() for path in held) and time.monotonic() < deadline:
            sweep_stale(layers)  # until the killed host's lock is released
            time.sleep(0.05)
        assert not any(path.is_dir() for path in held), "a dead host's cgroups were kept"
        assert not Path(f"{HOSTS_DIR}/{ident}.lock").exists()
    finally:
        if other.poll() is None:
            other.kill()
            other.wait(10)
        for stream in (other.stdin, other.stdout):
            if stream is not None:
                stream.close()
        for root in CGROUP_V1.values():
            with contextlib.suppress(OSError):
                (Path(root) / "plughost" / f"call-{ident}-held").rmdir()


def test_each_kind_of_host_keeps_its_lock_where_it_may_write() -> None:
    from sandbox.cgroups import HOSTS_DIR, hosts_dir

    assert hosts_dir(euid=0, environ={"XDG_RUNTIME_DIR": "/run/user/0"}) == HOSTS_DIR
    runtime = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert hosts_dir(euid=1000, environ=runtime) == "/run/user/1000/plughost/hosts"
    # A system service: no runtime directory, and /run read-only (ProtectSystem=strict).
    assert hosts_dir(euid=999, environ={}) is None
    assert hosts_dir(euid=999, environ={"XDG_RUNTIME_DIR": "relative"}) is None
