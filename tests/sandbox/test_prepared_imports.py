"""The finders of a call's import path, made in the launcher before the fork
(`sandbox.child._prepare_finders`): a child still sees its plugin
directory as it is when the call runs, not as the launcher listed it."""

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
