"""The fast path: prewarmed children. Limits and isolation hold on it, each
child still serves one call, and nothing is left when the sandbox closes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host.registry import PluginRegistry
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner
from tests.conftest import sandbox_processes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def warm(registry: PluginRegistry) -> Iterator[ToolRunner]:
    sandbox = Sandbox(prewarm=1)
    yield ToolRunner(sandbox=sandbox)
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
    runner = ToolRunner(sandbox=sandbox)
    runner.run("image_info", payload)
    _wait_warm(runner, 2)
    assert len(sandbox.warm_uids()) == 2
    sandbox.close()
    deadline = time.monotonic() + 3
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sandbox_processes() == []


@pytest.mark.no_leak_check
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
