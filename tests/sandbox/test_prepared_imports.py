"""What the launcher works out for a call before the fork
(`sandbox.inherited.prepare`): a child still sees its plugin directory as it is
when the call runs, not as the launcher listed it, and its own limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from host.registry import PluginRegistry
from sandbox.tool_runner import ToolRunner
from tests.conftest import write_plugin

pytestmark = pytest.mark.timeout(60)

BODY = (
    "try:\n"
    "    import helper\n"
    "except ModuleNotFoundError:\n"
    "    return {'helper': None}\n"
    "return {'helper': helper.VALUE}"
)


def test_a_module_added_after_the_launcher_listed_the_directory_imports(
    runner: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    directory = write_plugin(tmp_path, "late_helper", BODY)
    assert registry.load_directory(directory) == ["late_helper"]
    result, error = runner.run("late_helper", payload)
    assert error == {} and result == {"helper": None}
    (directory / "helper.py").write_text("VALUE = 'added later'\n")
    result, error = runner.run("late_helper", payload)
    assert error == {} and result == {"helper": "added later"}


def test_a_module_removed_after_the_launcher_listed_the_directory_is_gone(
    runner: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    directory = write_plugin(tmp_path, "gone_helper", BODY)
    (directory / "helper.py").write_text("VALUE = 'there'\n")
    assert registry.load_directory(directory) == ["gone_helper"]
    result, error = runner.run("gone_helper", payload)
    assert error == {} and result == {"helper": "there"}
    (directory / "helper.py").unlink()
    result, error = runner.run("gone_helper", payload)
    assert error == {} and result == {"helper": None}


def test_calls_with_other_limits_one_after_another_get_their_own_rlimits(
    runner: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    # The launcher works a call's rlimits out before the fork and keeps
    # them while the next call's limits are the same.
    body = "import resource\nreturn {'as': resource.getrlimit(resource.RLIMIT_AS)[0]}"
    for name, memory_mb in (("small_limits", 128), ("large_limits", 256)):
        directory = write_plugin(tmp_path, name, body, memory_mb=memory_mb)
        assert registry.load_directory(directory) == [name]
    seen: dict[str, set[int]] = {"small_limits": set(), "large_limits": set()}
    for name in ["small_limits", "large_limits"] * 2:
        result, error = runner.run(name, payload)
        assert error == {}, name
        seen[name].add(result["as"])
    # Each call's address space is its own memory limit plus the same room.
    assert len(seen["small_limits"]) == len(seen["large_limits"]) == 1
    assert seen["large_limits"].pop() - seen["small_limits"].pop() == 128 * 1024 * 1024


FIND_NAME = (
    "import gc\n"
    "needle = ''.join(['zq_private', '_model.py'])  # not a constant of this code\n"
    "found = []\n"
    "for obj in gc.get_objects():\n"
    "    if obj is not found and isinstance(obj, (set, frozenset, list, tuple, dict)):\n"
    "        for item in (obj.keys() if isinstance(obj, dict) else obj):\n"
    "            if isinstance(item, str) and needle in item:\n"
    "                found.append(item)\n"
    "return {'found': found[:5]}"
)


def test_a_call_finds_no_name_of_another_plugins_files_in_its_memory(
    runner: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    # Every child is a fork of the launcher, and the launcher prepares each
    # call's import path: what it read of one plugin's directory would be in
    # every later call's memory, of any plugin.
    other = write_plugin(tmp_path, "other_tenant", "return {'ok': True}")
    (other / "zq_private_model.py").write_text("WEIGHTS = 1\n")
    snoop = write_plugin(tmp_path, "snoop", FIND_NAME, memory_mb=512)
    for directory in (other, snoop):
        registry.load_directory(directory)
    result, error = runner.run("other_tenant", payload)
    assert error == {} and result == {"ok": True}
    result, error = runner.run("snoop", payload)
    assert error == {} and result == {"found": []}
