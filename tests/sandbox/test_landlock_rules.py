"""Landlock's rules, worked out in the launcher before the fork
(`sandbox.layers.landlock.rules_for`) and added by each child: attacked
where the launcher's view of a path and the child's differ."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from host.registry import PluginRegistry
from sandbox.layers import detect, landlock
from sandbox.layers.kernel import IsolationError
from sandbox.layers.privilege import no_new_privs
from sandbox.tool_runner import ToolRunner
from tests.conftest import write_plugin

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not detect().get("landlock"), reason="this machine lacks landlock"),
]


def _in_a_landlocked_child(rules: tuple[tuple[str, ...], ...], then: str) -> str:
    """Fork, apply `rules` (read-only, read-write, writable files), read the
    file `then`; what the child saw, as text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's outcome travels through the pipe
        outcome = "?"
        try:
            no_new_privs()
            landlock.apply_landlock(*rules)
            with open(then) as readable:
                outcome = "read: " + readable.read()
        except IsolationError as exc:
            outcome = f"isolation error: {exc}"
        except OSError as exc:
            outcome = f"refused: {type(exc).__name__}"
        finally:
            os.write(write_end, outcome.encode())
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            return pipe.read().decode()
    finally:
        os.waitpid(pid, 0)


def test_a_link_whose_target_a_directory_rule_covers_gets_no_rule(tmp_path: Path) -> None:
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "lib").symlink_to("usr/lib")  # a merged /usr's /lib
    (tmp_path / "other").symlink_to("elsewhere")  # covered by no rule
    usr, lib, other = str(tmp_path / "usr"), str(tmp_path / "lib"), str(tmp_path / "other")
    rules = dict(landlock.rules_for((usr, lib, other), (), ()))
    assert lib not in rules
    assert usr in rules and other in rules


def test_a_path_named_twice_gets_one_rule_with_both_rights(tmp_path: Path) -> None:
    device = tmp_path / "null"
    device.write_text("")
    rules = landlock.rules_for((str(device),), (), (str(device),))
    assert len(rules) == 1
    path, rights = rules[0]
    assert path == str(device)
    wanted = landlock.FS_READ_FILE | landlock.FS_WRITE_FILE | landlock.FS_EXECUTE
    assert rights == wanted  # a file's rights only: no READ_DIR


def test_a_file_at_the_scratch_path_does_not_narrow_the_scratch(tmp_path: Path) -> None:
    # The minimal root mounts its own scratch directory; whatever another
    # user left at that path on the host must not shape its rule.
    planted = tmp_path / "work"
    planted.write_text("a file where the scratch directory goes")
    rules = dict(landlock.rules_for((), (str(planted),), ()))
    assert rules[str(planted)] & landlock.FS_MAKE_REG
    assert rules[str(planted)] & landlock.FS_READ_DIR


def test_a_path_planned_as_a_directory_that_is_a_file_in_the_child(tmp_path: Path) -> None:
    # Missing when the launcher worked the rules out (taken as a directory),
    # a file by the time the child adds them: the child gets the file's
    # rights, and can read it; without the retry, add_rule refused it and
    # the call failed.
    late = tmp_path / "late"
    key = ((str(late),), (), ())
    landlock.rules_for(*key)
    late.write_text("here now")
    assert _in_a_landlocked_child(key, str(late)) == "read: here now"


def test_a_planned_rule_still_denies_what_it_does_not_name(tmp_path: Path) -> None:
    allowed, denied = tmp_path / "allowed", tmp_path / "denied"
    allowed.mkdir()
    denied.mkdir()
    (denied / "secret").write_text("not for the plugin")
    key = ((str(allowed),), (), ())
    landlock.rules_for(*key)
    assert _in_a_landlocked_child(key, str(denied / "secret")) == "refused: PermissionError"


def test_system_paths_through_their_links_stay_readable(
    runner: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    # /lib, /lib64 and /bin are links into /usr on a merged /usr: their
    # rules are left out, and the paths still resolve and read in a call.
    body = (
        "import os\n"
        "found = {}\n"
        "for path in ('/lib', '/lib64', '/bin', '/etc/localtime'):\n"
        "    if os.path.isdir(path):\n"
        "        found[path] = len(os.listdir(path)) > 0\n"
        "    elif os.path.exists(path):\n"
        "        found[path] = len(open(path, 'rb').read(16)) > 0\n"
        "return found"
    )
    write_plugin(tmp_path, "links", body)
    assert registry.load_directory(tmp_path / "links") == ["links"]
    result, error = runner.run("links", payload)
    assert error == {}
    host = {p for p in ("/lib", "/lib64", "/bin", "/etc/localtime") if os.path.exists(p)}
    assert set(result) == host
    assert all(result.values()), result
