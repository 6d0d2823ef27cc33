"""The fast path: prewarmed children. Limits and isolation hold on it, each
child still serves one call, and nothing is left when the sandbox closes."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from host.registry import PluginRegistry
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner
from tests.conftest import sandbox_processes, write_plugin

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def warm(registry: PluginRegistry) -> Iterator[ToolRunner]:
    sandbox = Sandbox(prewarm=1)
    yield ToolRunner(registry, sandbox)
    sandbox.close()
    assert sandbox.warm_uids() == set()


def _wait_warm(runner: ToolRunner, count: int = 1) -> None:
    deadline = time.monotonic() + 10
    while runner.sandbox.warm_count() < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_second_call_uses_a_warm_child_and_gets_the_same_answer(
    warm: ToolRunner, payload: dict
) -> None:
    cold, error = warm.run("image_info", payload)
    assert error == {}
    _wait_warm(warm)
    hot, error = warm.run("image_info", payload)
    assert error == {} and hot == cold
    assert warm.sandbox.warm_hits == 1


def test_a_long_calls_successor_is_prepared_while_it_runs(
    warm: ToolRunner, registry: PluginRegistry, payload: dict, tmp_path: Path
) -> None:
    # Back-to-back calls of a plugin that runs a while each find a warm child:
    # the next one is set up beside the call, not after it.
    write_plugin(tmp_path, "nap", "time.sleep(1)\nreturn {}", timeout_s=10)
    assert registry.load_directory(tmp_path / "nap") == ["nap"]
    for _ in range(3):
        result, error = warm.run("nap", payload)
        assert error == {} and result == {}
    assert warm.sandbox.warm_hits == 2


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("busy_loop", "timeout"),
        ("huge_allocation", "memory_limit"),
        ("memory_in_grandchildren", "memory_limit"),
        ("fork_bomb", "plugin_raised"),
        ("signal_host", "plugin_raised"),
        ("write_outside_scratch", "plugin_raised"),
        ("segfault", "crashed"),
        ("setsid_grandchild", "timeout"),
    ],
)
def test_limits_and_isolation_hold_on_a_warm_child(
    warm: ToolRunner, payload: dict, registry: PluginRegistry, case: str, reason: str
) -> None:
    warm.run(case, payload)  # cold; warms a child for this plugin
    _wait_warm(warm)
    hits = warm.sandbox.warm_hits
    started = time.monotonic()
    _, error = warm.run(case, payload)
    assert warm.sandbox.warm_hits == hits + 1
    assert error["error"]["details"]["reason"] == reason
    assert time.monotonic() - started < 1.5  # 1 s limits, counted from the hand-over


def test_a_warm_child_serves_one_call_only(
    warm: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    from tests.conftest import write_plugin

    write_plugin(
        tmp_path,
        "counter",
        "import builtins\n"
        "builtins.calls = getattr(builtins, 'calls', 0) + 1\n"
        "return {'calls': builtins.calls, 'pid': os.getpid()}",
    )
    assert registry.load_directory(tmp_path / "counter") == ["counter"]
    seen = []
    for _ in range(4):
        result, error = warm.run("counter", payload)
        assert error == {}
        seen.append(result)
        _wait_warm(warm)
    assert all(r["calls"] == 1 for r in seen)  # a fresh interpreter state every call
    assert warm.sandbox.warm_hits >= 2


def test_closing_the_sandbox_leaves_no_warm_child(payload: dict, registry: PluginRegistry) -> None:
    sandbox = Sandbox(prewarm=2)
    runner = ToolRunner(registry, sandbox)
    runner.run("image_info", payload)
    _wait_warm(runner, 2)
    assert len(sandbox.warm_uids()) == 2
    launcher = sandbox.launcher.pid
    assert _keepers() == 1
    sandbox.close()
    assert _keepers() == 0  # the warm pool's timer stopped with it
    deadline = time.monotonic() + 3
    while sandbox_processes(launcher) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sandbox_processes(launcher) == []


def _keepers() -> int:
    import threading

    return sum(thread.name == "plughost-warm-keeper" for thread in threading.enumerate())


@pytest.mark.no_leak_check
@pytest.mark.timeout(
    300
)  # the whole corpus twice: about 30 s on a quiet machine, 90 s on a busy one
def test_crash_suite_passes_on_the_fast_path(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "host.cli", "crash-suite", "--prewarm", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert " 0 failed" in result.stdout


def _process_with_pid(pid: int) -> subprocess.Popen[bytes] | None:
    """A harmless process that got `pid` (the kernel hands out pids in order)."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as stream:
            stream.write(str(pid - 1))
        victim = subprocess.Popen(["sleep", "60"])
        if victim.pid == pid:
            return victim
        victim.kill()
        victim.wait(5)
    return None


@pytest.mark.skipif(not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK), reason="needs root")
def test_putting_away_a_dead_warm_child_never_kills_the_process_that_reused_its_pid(
    warm: ToolRunner, payload: dict
) -> None:
    # pid_max is 32768 on many machines: under load a pid comes round again
    # within minutes, and a warm child that died while waiting is put away
    # only when its plugin is next called.
    assert warm.run("image_info", payload)[1] == {}
    _wait_warm(warm)
    (dead,) = warm.sandbox.warm_pids()
    os.kill(dead, signal.SIGKILL)  # the warm child dies while it waits
    deadline = time.monotonic() + 5
    while psutil.pid_exists(dead) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the launcher has reaped it
    victim = _process_with_pid(dead)
    assert victim is not None, "could not start a process with the freed pid"
    try:
        assert warm.run("image_info", payload)[1] == {}  # puts the dead slot away
        time.sleep(0.2)
        assert victim.poll() is None, "the process that reused the pid was killed"
    finally:
        victim.kill()
        victim.wait(5)


def test_warm_slots_are_checked_on_descriptors_past_1024() -> None:
    # A server that raised its descriptor limit for many connections hands
    # warm children descriptors beyond select()'s reach.
    from sandbox.handle import _readable

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), max(hard, 2048)))
    read_end, write_end = os.pipe()
    high = os.dup2(read_end, 1500)
    try:
        assert _readable(high) is False
        os.write(write_end, b"x")
        assert _readable(high) is True
    finally:
        for fd in (read_end, write_end, high):
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_warm_child_is_ready_before_any_plugin_code_runs(
    warm: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    # A warm child imports its plugin before its payload arrives, but only
    # after its ready frame: from then on whatever the plugin does (here a
    # frame of its own, written while imported) is the plugin's doing, never
    # something that could pass for the sandbox's set-up failing.
    directory = tmp_path / "import_frame"
    directory.mkdir()
    (directory / "plugin.toml").write_text(
        'name = "import_frame"\nversion = "1.0.0"\nentrypoint = "frame:Plugin"\n'
    )
    (directory / "frame.py").write_text(
        "import os\nos.write(3, b'\\x00\\x00\\x00\\x02{}')\n\n"
        "class Plugin:\n    def run(self, payload):\n        return {'ok': True}\n"
    )
    directory.chmod(0o755)
    tmp_path.chmod(0o755)
    assert registry.load_directory(directory) == ["import_frame"]
    messages = []
    for call in range(3):
        if call:
            _wait_warm(warm)  # the first call starts the pool's child
        result, error = warm.run("import_frame", payload)
        assert result == {} and error["error"]["details"]["reason"] == "protocol_violation"
        messages.append(error["error"]["message"])
    assert warm.sandbox.warm_hits >= 2
    assert not any("ready marker" in message for message in messages), messages


# A plugin that runs code of its own from its import on: a thread (or a
# grandchild it forks) records the moments it runs, and `run` reports them
# as intervals of activity (marks less than 0.1 s apart belong to one).
IDLE_SPY = """
import os, struct, threading, time

MARKS = os.path.join(os.environ.get("TMPDIR", "/tmp"), "marks")


def _record():
    with open(MARKS, "ab", buffering=0) as out:
        while True:
            out.write(struct.pack("d", time.monotonic()))
            time.sleep(0.005)


if {how!r} == "thread":
    threading.Thread(target=_record, daemon=True).start()
elif os.fork() == 0:
    try:
        _record()
    finally:
        os._exit(0)


def _runs():
    with open(MARKS, "rb") as stream:
        data = stream.read()
    marks = [value for (value,) in struct.iter_unpack("d", data[: len(data) // 8 * 8])]
    runs = []
    for mark in marks:
        if runs and mark - runs[-1][1] < 0.1:
            runs[-1][1] = mark
        else:
            runs.append([mark, mark])
    return runs[-50:]


class Plugin:
    def run(self, payload):
        time.sleep(0.05)  # long enough for the recorder to mark that it runs again
        return {{"runs": _runs()}}
"""


def _idle_spy(registry: PluginRegistry, tmp_path: Path, how: str) -> None:
    directory = tmp_path / "idle_spy"
    directory.mkdir()
    (directory / "plugin.toml").write_text(
        'name = "idle_spy"\nversion = "1.0.0"\nentrypoint = "idle_spy:Plugin"\n'
        "[limits]\ntimeout_s = 5\n"
    )
    (directory / "idle_spy.py").write_text(IDLE_SPY.format(how=how))
    directory.chmod(0o755)
    tmp_path.chmod(0o755)
    assert registry.load_directory(directory) == ["idle_spy"]


@pytest.mark.parametrize(
    ("how", "disabled"),
    [
        ("thread", ()),
        ("grandchild", ()),
        # No uid of its own to stop the call by: the plugin is imported after the hand-over.
        ("thread", ("privilege_drop",)),
    ],
    ids=["thread", "grandchild", "thread-without-a-uid"],
)
def test_a_warm_child_runs_no_plugin_code_while_it_waits(
    registry: PluginRegistry, tmp_path: Path, payload: dict, how: str, disabled: tuple[str, ...]
) -> None:
    # What a plugin's import starts must not run while its warm child waits
    # for a call: it could watch the machine (/proc/stat) while other
    # clients' calls run, and tell in its own result when and for how long.
    _idle_spy(registry, tmp_path, how)
    sandbox = Sandbox(prewarm=1, disabled=disabled)
    warm = ToolRunner(registry, sandbox)
    try:
        assert warm.run("idle_spy", payload)[1] == {}  # cold; starts the pool's child
        _wait_warm(warm)
        idle_from = time.monotonic()
        time.sleep(1.0)
        called = time.monotonic()
        result, error = warm.run("idle_spy", payload)
        assert error == {} and warm.sandbox.warm_hits == 1
    finally:
        sandbox.close()
    runs = result["runs"]
    assert runs[-1][1] > called, runs  # it runs again once its call has come
    during_the_wait = [run for run in runs if run[1] > idle_from and run[0] < called]
    assert during_the_wait == [], (idle_from, called, runs)


def test_a_warm_child_whose_call_cannot_be_stopped_is_never_handed_a_call(
    registry: PluginRegistry, tmp_path: Path, payload: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The launcher's stopper did not report every thread stopped in time (a
    # thread in an uninterruptible wait, the launcher gone): the warm child
    # is put away and the call starts cold, within its own deadline.
    from sandbox.launcher_client import Launcher

    monkeypatch.setattr(Launcher, "stop_uid", lambda self, uid: None)
    _idle_spy(registry, tmp_path, "thread")
    sandbox = Sandbox(prewarm=1)
    runner = ToolRunner(registry, sandbox)
    try:
        for _ in range(3):
            assert runner.run("idle_spy", payload)[1] == {}
            sandbox.settle()
            deadline = time.monotonic() + 5
            while sandbox.warm_pids() and time.monotonic() < deadline:
                time.sleep(0.01)  # until its plugin is imported and its stop refused
            assert sandbox.warm_count() == 0 and sandbox.warm_pids() == set()
        assert sandbox.warm_hits == 0
    finally:
        sandbox.close()


def test_an_idle_warm_child_is_put_away_at_its_idle_limit_without_another_call(
    registry: PluginRegistry, payload: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox import prewarm

    monkeypatch.setattr(prewarm, "WARM_IDLE_S", 3.0)
    sandbox = Sandbox(prewarm=1)
    runner = ToolRunner(registry, sandbox)
    try:
        assert runner.run("image_info", payload)[1] == {}
        _wait_warm(runner)
        (uid,) = sandbox.warm_uids()
        (pid,) = sandbox.warm_pids()
        fds = sandbox.warm_fds()
        assert fds > 0

        def of_uid() -> list[int]:
            procs = psutil.process_iter(["uids", "status"])
            return [
                p.pid
                for p in procs
                if p.info["uids"] and p.info["uids"].real == uid
                if p.info["status"] != psutil.STATUS_ZOMBIE
            ]

        deadline = time.monotonic() + 3.0 + 5
        while time.monotonic() < deadline and (
            sandbox.warm_uids() or of_uid() or uid not in sandbox.uids_at_rest() or _keepers()
        ):
            time.sleep(0.05)
        assert _keepers() == 0  # the timer ends with nothing left to keep
        # Gone without any further call: its processes, its uid, its cgroups
        # (kept empty for the uid's next call) and the host's descriptors.
        assert sandbox.warm_count() == 0 and sandbox.warm_uids() == set()
        assert of_uid() == [] and not psutil.pid_exists(pid)
        assert uid in sandbox.uids_at_rest()
        assert sandbox.warm_fds() == 0
        kept = [path for path in sandbox.kept_cgroups() if path.name.endswith(f"u{uid}")]
        assert kept and all(not (path / "cgroup.procs").read_text().strip() for path in kept)
    finally:
        sandbox.close()


def test_a_warm_child_still_importing_after_its_timeout_is_put_away_without_another_call(
    registry: PluginRegistry, payload: dict
) -> None:
    # import_hang never finishes its import: its warm child runs plugin code
    # for as long as a call to it may take (1 s), no longer.
    import threading

    sandbox = Sandbox(prewarm=1)
    runner = ToolRunner(registry, sandbox)
    cold = threading.Thread(target=runner.run, args=("import_hang", payload))
    try:
        cold.start()  # times out; starts the pool's child at once
        deadline = time.monotonic() + 5
        while not sandbox.warm_pids() and time.monotonic() < deadline:
            time.sleep(0.005)
        started = time.monotonic()
        (pid,) = sandbox.warm_pids()
        while sandbox.warm_pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sandbox.warm_pids() == set() and time.monotonic() - started < 3.0
        cold.join()
        sandbox.settle()
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert sandbox.warm_hits == 0
    finally:
        cold.join()
        sandbox.close()
