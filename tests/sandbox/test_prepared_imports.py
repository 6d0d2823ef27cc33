"""What the launcher works out for a call before the fork
(`sandbox.child.prepare`): a child still sees its plugin directory as it is
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
    for name, memory_mb in [("small_limits", 128), ("large_limits", 256)] * 2:
        result, error = runner.run(name, payload)
        assert error == {} and result == {"as": memory_mb * 1024 * 1024}, name
