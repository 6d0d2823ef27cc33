"""What a failed call shows its client names no host path (sandbox/host_paths.py):
a crashing plugin's stderr tail, where faulthandler prints its stack, and
the traceback of a plugin's exception show the plugin's frames relative to
its directory and its own output, never the sandbox's code, the host's
checkout or site-packages, or the interpreter's install path."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

import sandbox
from host.registry import PluginRegistry
from sandbox.host_paths import HostPaths
from sandbox.tool_runner import ToolRunner
from tests.conftest import write_plugin

ROOT = Path(__file__).resolve().parents[2]
CODE = Path(sandbox.__file__).resolve().parent


def host_paths_shown(envelope: dict[str, Any], plugin_dir: Path) -> list[str]:
    """Host paths anywhere in the envelope, its `_internal` traceback included."""
    text = json.dumps(envelope, ensure_ascii=False)
    places = {str(ROOT), str(CODE), sys.prefix, sys.base_prefix, sys.exec_prefix, str(plugin_dir)}
    places = {place for place in places if len(Path(place).parts) > 2}
    words = ("sandbox/child.py", "sandbox/launcher.py", "site-packages/sandbox")
    return sorted(word for word in [*places, *words] if word in text)


def _run(runner: ToolRunner, registry: PluginRegistry, directory: Path, payload: Any) -> Any:
    registry.load_directory(directory.parent)
    result, error = runner.run(directory.name, payload)
    assert not result
    return error


def test_a_segfaulting_plugins_envelope_shows_its_frames_and_no_host_path(
    tmp_path: Path, runner: ToolRunner, registry: PluginRegistry, payload: dict[str, Any]
) -> None:
    directory = write_plugin(
        tmp_path,
        "segv_stack",
        """
import ctypes, faulthandler, os, sys, traceback
traceback.print_stack()
print("mine:", __file__, os.__file__, file=sys.stderr, flush=True)
faulthandler.enable()
ctypes.string_at(0)
""",
    )
    error = _run(runner, registry, directory, payload)
    details = error["error"]["details"]
    assert details["reason"] == "crashed" and details["signal"] == "SIGSEGV"
    tail = details["stderr_tail"]
    assert "Fatal Python error: Segmentation fault" in tail
    assert 'File "segv_stack_mod.py", line ' in tail  # its own frame, relative
    assert 'File "<python>/ctypes/__init__.py"' in tail  # the standard library's, no prefix
    assert 'File "<sandbox>"' in tail  # the host's frames, folded
    assert "mine: ./segv_stack_mod.py <python>/os.py" in tail  # its output, its view
    assert host_paths_shown(error, directory) == []


def test_a_raising_plugins_traceback_shows_only_its_own_frames(
    tmp_path: Path, runner: ToolRunner, registry: PluginRegistry, payload: dict[str, Any]
) -> None:
    directory = write_plugin(
        tmp_path,
        "raises_here",
        """
import json
json.loads("{" + repr(__file__))
""",
    )
    error = _run(runner, registry, directory, payload)
    assert error["error"]["details"]["reason"] == "plugin_raised"
    trace = error["_internal"]["traceback"]
    assert 'File "raises_here_mod.py", line ' in trace
    assert 'File "<python>/json/__init__.py", line ' in trace
    assert trace.splitlines()[1] == '  File "<sandbox>"'  # what called the plugin
    assert host_paths_shown(error, directory) == []


@pytest.mark.parametrize(
    ("frame", "shown"),
    [
        ('  File "/srv/plugins/p/mod.py", line 3, in run', '  File "mod.py", line 3, in run'),
        (
            '  File "/srv/env/site/numpy/a.py", line 9 in f',
            '  File "<packages>/numpy/a.py", line 9 in f',
        ),
        ('  File "mod.py", line 3, in run', '  File "mod.py", line 3, in run'),
        (
            '  File "<frozen importlib._bootstrap>", line 1',
            '  File "<frozen importlib._bootstrap>", line 1',
        ),
        (f'  File "{CODE}/child.py", line 5, in main', '  File "<sandbox>"'),
        ('  File "/opt/anything/else.py", line 5, in f', '  File "<sandbox>"'),
    ],
)
def test_each_frame_is_shown_as_the_plugin_sees_it(frame: str, shown: str) -> None:
    paths = HostPaths("/srv/plugins/p", ["/srv/env/site"])
    assert paths.scrub(frame) == shown
    assert paths.scrub(paths.scrub(frame)) == shown  # the child's filter, then the runner's


def test_host_frames_fold_into_one_line_without_their_source() -> None:
    text = "\n".join(
        [
            "Traceback (most recent call last):",
            f'  File "{CODE}/launcher.py", line 1, in main',
            "    serve()",
            f'  File "{CODE}/child.py", line 2, in _run_plugin',
            "    result = plugin.run(payload.as_dict())",
            "             ^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
            '  File "/srv/plugins/p/mod.py", line 3, in run',
            "    raise ValueError(x)",
            f"ValueError: {sys.prefix}/lib and /srv/plugins/p/data.bin",
        ]
    )
    assert HostPaths("/srv/plugins/p").scrub(text).splitlines() == [
        "Traceback (most recent call last):",
        '  File "<sandbox>"',
        '  File "mod.py", line 3, in run',
        "    raise ValueError(x)",
        "ValueError: <host>/lib and ./data.bin",
    ]
