"""The plugin author's kit, end to end: declared dependencies in environments
of their own, `plughost new` / `check`, options schemas, and tracebacks.

Environments are prepared for real with uv from the package index, into the
test run's environment store (PLUGHOST_ENV_DIR), so a second run is cheap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from host.discovery import discover
from host.environments import EnvStatus
from host.preparation import environment_store
from host.registry import PluginRegistry
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner
from tests.conftest import ENV_DIR
from tests.host.conftest import check_versions, probe_plugin

pytestmark = pytest.mark.timeout(300)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "host.cli", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
        env={**os.environ, "PLUGHOST_ENV_DIR": ENV_DIR},
    )


def test_conflicting_dependencies_both_run_through_the_cli(conflicting: Path, png: bytes) -> None:
    image = conflicting / "in.png"
    image.write_bytes(png)
    for name in ("np_stats", "six_new"):
        run = _cli("run", name, "--plugins-dir", str(conflicting), "--image", str(image))
        assert run.returncode == 0, run.stdout + run.stderr
        check_versions(json.loads(run.stdout)["result"], name)


def test_no_environment_is_built_inside_a_call(
    tmp_path: Path, png: bytes, sandbox: Sandbox
) -> None:
    probe_plugin(
        tmp_path / "plugins", "late", ["six==1.17.0"], "import six\n        versions = {'six': 1}"
    )
    registry = PluginRegistry()
    registry.environments = environment_store(tmp_path / "envs")
    discover(registry, [tmp_path / "plugins"])
    runner = ToolRunner(registry, sandbox)
    payload = {"image": png, "mime_type": "image/png", "options": {}}
    result, error = runner.run("late", payload)
    assert result == {} and error["error"]["details"]["reason"] == "environment_not_ready"
    assert "plughost plugins prepare" in error["error"]["message"]
    assert not (tmp_path / "envs" / "by-spec").exists()  # the call installed nothing
    assert registry.environment("late").status is EnvStatus.MISSING
    state = registry.environments.prepare("late", registry.get_plugin("late").requirements)
    assert state.status is EnvStatus.READY
    result, error = runner.run("late", payload)
    assert error == {} and result["importable"] == []


def test_new_then_check_then_the_authors_own_tests_pass(tmp_path: Path) -> None:
    made = _cli("new", "demo", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    check = _cli("check", str(tmp_path / "demo"))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "sunset.png" in check.stdout and "check passed" in check.stdout
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "2 passed" in tests.stdout


WRONG_ENTRYPOINT = (
    "plugin.toml: field 'entrypoint': bad.py has no top-level 'Plugin'; it defines Bad: "
    'set entrypoint = "bad:Bad"'
)


@pytest.mark.parametrize(
    ("manifest", "module", "expected"),
    [
        (
            'name = "bad"\nversion = "1"\nentrypoint = "bad:Bad"\n',
            "class Bad:\n    def run(self, payload)\n        return {}\n",
            "bad.py:2: syntax error",
        ),
        (
            'name = "bad"\nversion = "1"\nentrypoint = "bad:Plugin"\n',
            "class Bad:\n    def run(self, payload):\n        return {}\n",
            WRONG_ENTRYPOINT,
        ),
        (
            'name = "bad"\nversion = "1"\nentrypoint = "bad:Bad"\n[limits]\ntimeout_s = 600\n',
            "class Bad:\n    def run(self, payload):\n        return {}\n",
            "plugin.toml: field 'limits.timeout_s': 600 s is over the host's maximum of 60 s",
        ),
    ],
    ids=["syntax_error", "wrong_entrypoint", "over_limit"],
)
def test_check_names_the_file_and_what_to_change(
    tmp_path: Path, manifest: str, module: str, expected: str
) -> None:
    directory = tmp_path / "bad"
    directory.mkdir()
    (directory / "plugin.toml").write_text(manifest)
    (directory / "bad.py").write_text(module)
    check = _cli("check", str(directory))
    assert check.returncode == 1
    assert f"problem: {directory}/{expected}" in check.stdout, check.stdout


def test_plugins_exits_non_zero_on_a_broken_manifest(tmp_path: Path) -> None:
    directory = tmp_path / "broken"
    directory.mkdir()
    (directory / "plugin.toml").write_text('name = "broken"\nversion = "1"\n')
    listed = _cli("plugins", "--plugins-dir", str(tmp_path))
    assert listed.returncode == 1
    assert "broken/plugin.toml: field 'entrypoint'" in listed.stderr


def test_run_debug_shows_the_plugins_frames_and_never_the_hosts(tmp_path: Path, png: bytes) -> None:
    directory = tmp_path / "kerr"
    directory.mkdir()
    (directory / "plugin.toml").write_text('name = "kerr"\nversion = "1"\nentrypoint = "kerr:K"\n')
    (directory / "kerr.py").write_text(
        "def helper(d):\n    return d['missing']\n\n\nclass K:\n"
        "    def run(self, payload):\n        return helper({})\n"
    )
    image = tmp_path / "in.png"
    image.write_bytes(png)
    run = _cli("run", "kerr", "--plugins-dir", str(tmp_path), "--image", str(image), "--debug")
    assert run.returncode == 1
    assert json.loads(run.stdout)["error"]["details"]["exception"] == "KeyError"
    # Its files relative to its directory: no host path, not even the plugin's own.
    assert 'File "kerr.py", line 2, in helper' in run.stderr
    assert "KeyError: 'missing'" in run.stderr
    assert str(directory) not in run.stderr and "<sandbox>" not in run.stderr
    assert "sandbox/child.py" not in run.stderr and "_internal" not in run.stdout


PRINTS = "        print('seen by the author', len(image))\n"


def _scaffold_printing(tmp_path: Path, extra: str = "") -> Path:
    made = _cli("new", "demo", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    module = tmp_path / "demo" / "demo.py"
    text = module.read_text()
    anchor = '        image = payload["image"]\n'
    assert anchor in text
    module.write_text(text.replace(anchor, anchor + PRINTS + extra))
    return tmp_path / "demo"


def test_a_fresh_author_sees_their_print_in_check(tmp_path: Path) -> None:
    directory = _scaffold_printing(tmp_path)
    check = _cli("check", str(directory))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "what it printed:\n    stdout:\n      seen by the author" in check.stdout


def test_run_debug_shows_what_the_plugin_printed_and_its_peak(tmp_path: Path, png: bytes) -> None:
    directory = _scaffold_printing(tmp_path)
    image = tmp_path / "in.png"
    image.write_bytes(png)
    run = _cli("run", "demo", "--plugins-dir", str(tmp_path), "--image", str(image), "--debug")
    assert run.returncode == 0, run.stderr
    assert f"seen by the author {len(png)}" in run.stderr
    assert "peak RSS" in run.stderr and "peak RSS 0.0" not in run.stderr
    assert "seen by the author" not in run.stdout  # the result document is the client's
    plain = _cli("run", "demo", "--plugins-dir", str(tmp_path), "--image", str(image))
    assert "seen by the author" not in plain.stdout + plain.stderr
    assert directory.is_dir()


def test_a_failing_fixture_test_shows_the_plugins_traceback_and_output(tmp_path: Path) -> None:
    directory = _scaffold_printing(tmp_path, "        raise ValueError('no edges here')\n")
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, "PLUGHOST_ENV_DIR": ENV_DIR},
    )
    report = tests.stdout
    assert tests.returncode == 1, report + tests.stderr
    # `assert error == {}` explains the failure in the plugin's own terms.
    assert "assert the plugin's call failed: plugin_raised: no edges here" in report
    assert 'File "demo.py", line' in report and "ValueError: no edges here" in report
    # The report's section of the call: its traceback and what it printed.
    assert "Captured plughost demo call" in report
    assert "seen by the author" in report
    # Neither the envelope's plumbing nor the host's frames.
    assert "_internal" not in report and "<sandbox>" not in report
    assert "importlib/__init__.py" not in report and "sandbox/child.py" not in report


def test_run_names_a_missing_module_and_what_to_declare(tmp_path: Path, png: bytes) -> None:
    directory = tmp_path / "needy"
    directory.mkdir()
    (directory / "plugin.toml").write_text(
        'name = "needy"\nversion = "1"\nentrypoint = "needy:N"\n'
    )
    (directory / "needy.py").write_text(
        "import cv2\n\n\nclass N:\n    def run(self, payload):\n        return {}\n"
    )
    image = tmp_path / "in.png"
    image.write_bytes(png)
    run = _cli("run", "needy", "--plugins-dir", str(tmp_path), "--image", str(image), "--debug")
    assert run.returncode == 1
    assert json.loads(run.stdout)["error"]["details"]["reason"] == "load_failed"
    assert "the plugin imports 'cv2', which is not installed for it" in run.stderr
    assert 'add "opencv-python' in run.stderr
    # The traceback starts in the plugin's file, not in importlib.
    frames = [line for line in run.stderr.splitlines() if line.startswith("  File ")]
    assert frames == ['  File "needy.py", line 1, in <module>'], run.stderr
    check = _cli("check", str(directory))
    assert check.returncode == 1
    assert "needy.py:1: imports cv2, which `dependencies` does not declare" in check.stdout


def test_check_and_run_debug_show_a_failures_control_characters_escaped(
    tmp_path: Path, png: bytes
) -> None:
    # A message and a traceback are the plugin's text: a terminal must not obey them.
    raises = "        raise RuntimeError('\\x1b]0;title\\x07\\x1b[2J gone')\n"
    _scaffold_printing(tmp_path, raises)
    check = _cli("check", str(tmp_path / "demo"))
    image = tmp_path / "in.png"
    image.write_bytes(png)
    debug = _cli("run", "demo", "--plugins-dir", str(tmp_path), "--image", str(image), "--debug")
    for shown in (check.stdout + check.stderr, debug.stderr):
        assert "\x1b" not in shown and "\x07" not in shown
        assert "\\x1b]0;title" in shown
