"""A plugin's requirements, read by the host as an outside attacker would
write them: a lock is `name==version --hash=sha256:...` lines and nothing
else, and what is refused is a load error naming the file and the line.
The installer is never started for a refused lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from host.discovery import find_plugins
from host.environments import EnvironmentStore, EnvStatus, Requirements
from host.manifest import ManifestError, load_manifest

HASH = "sha256:" + "ab" * 32
GOOD = f"six==1.17.0 --hash={HASH}\n"

# (what the attacker writes on line 3, what the error must say)
REFUSED = {
    "no_binary": (f"--no-binary six\n{GOOD}", "installer option ('--no-binary')"),
    "no_binary_on_the_line": (
        f"six==1.17.0 --no-binary six --hash={HASH}",
        "installer option ('--no-binary')",
    ),
    "find_links": ("--find-links /tmp/wheels", "installer option ('--find-links')"),
    "index_url": ("--index-url=https://evil.example/simple", "installer option"),
    "extra_index_url": ("--extra-index-url https://evil.example/simple", "installer option"),
    "include": ("-r /etc/shadow", "include of another file ('-r')"),
    "include_attached": ("-r/etc/shadow", "include of another file ('-r')"),
    "include_long": ("--requirement=/etc/shadow", "include of another file"),
    "constraint": ("-c /etc/shadow", "constraints file ('-c')"),
    "editable": ("-e .", "editable install ('-e')"),
    "url": ("https://evil.example/six-1.17.0.tar.gz", "URLs"),
    "direct_reference": (f"six @ https://evil.example/six.tar.gz --hash={HASH}", "URLs"),
    "file_url": (f"six @ file:///etc/shadow --hash={HASH}", "URLs"),
    "path": ("./local_package", "paths are not allowed"),
    "absolute_path": ("/etc/shadow", "paths are not allowed"),
    "range": (f"six>=1.16 --hash={HASH}", "not `name==version`"),
    "no_hash": ("six==1.17.0", "no --hash=sha256"),
    "weak_hash": (f"six==1.17.0 --hash=md5:{'0' * 32}", "a hash is `sha256:`"),
    "option_in_a_continuation": (
        f"six==1.17.0 \\\n  --no-binary six \\\n  --hash={HASH}",
        "('--no-binary')",
    ),
    "form_feed_splits_for_pip": (
        f"six==1.17.0 --hash={HASH}\f-r /etc/shadow",
        "control characters",
    ),
    "twice": (f"{GOOD}six==1.16.0 --hash={HASH}", "pinned twice"),
    "marker_hiding_an_option": (
        f'six==1.17.0 ; python_version >= "3 --no-binary" --hash={HASH}',
        "not an environment marker",
    ),
}


def _plugin(root: Path, lock: str | bytes | None = None, dependencies: str = "[]") -> Path:
    directory = root / "locked"
    directory.mkdir(parents=True)
    (directory / "plugin.toml").write_text(
        'name = "locked"\nversion = "1.0"\nentrypoint = "locked:Plugin"\n'
        f"dependencies = {dependencies}\n"
    )
    (directory / "locked.py").write_text(
        "class Plugin:\n    def run(self, payload):\n        return {}\n"
    )
    if isinstance(lock, str):
        (directory / "requirements.lock").write_text(lock)
    elif isinstance(lock, bytes):
        (directory / "requirements.lock").write_bytes(lock)
    return directory


def _load_error(directory: Path) -> str:
    """The one load error of the plugin in `directory` (it must not load)."""
    found, errors = find_plugins(directory)
    assert found == [], "a plugin with a refused requirements file was registered"
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_lock_with_anything_but_pinned_hashed_packages_is_refused_naming_the_line(
    tmp_path: Path, case: str
) -> None:
    line, expected = REFUSED[case]
    header = "# pinned by uv pip compile --generate-hashes\n\n"
    directory = _plugin(tmp_path, header + line + "\n")
    error = _load_error(directory)
    assert str(directory / "requirements.lock") in error
    failing = 4 if case == "twice" else 3  # the second pin is the wrong one
    assert f"line {failing}:" in error, error
    assert expected in error, error


def test_a_lock_that_is_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text(GOOD)
    directory = _plugin(tmp_path)
    (directory / "requirements.lock").symlink_to(secret)
    error = _load_error(directory)
    assert "requirements.lock" in error and "symbolic link" in error


def test_a_lock_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path: Path) -> None:
    directory = _plugin(tmp_path)
    os.mkfifo(directory / "requirements.lock")  # a read would wait for a writer forever
    error = _load_error(directory)
    assert "requirements.lock" in error and "not a regular file" in error


def test_an_oversized_lock_is_refused(tmp_path: Path) -> None:
    comment = "# " + "x" * 1000 + "\n"
    directory = _plugin(tmp_path, GOOD + comment * 300)
    error = _load_error(directory)
    assert "requirements.lock" in error and "larger than 256 KiB" in error


def test_a_lock_that_is_not_utf8_is_refused_naming_the_line(tmp_path: Path) -> None:
    directory = _plugin(tmp_path, GOOD.encode() + b"\xff\xfe\n")
    error = _load_error(directory)
    assert "line 2:" in error and "UTF-8" in error


def test_a_lock_is_normalised_to_the_packages_it_pins(tmp_path: Path) -> None:
    other = "sha256:" + "cd" * 32
    lock = (
        "# comment\n\n"
        "Six==1.17.0 \\\n"
        f"    --hash={HASH} \\\n"
        f"    --hash {other}  # trailing comment\n"
        f'tomli-w==1.2.0 ; python_version >= "3.8" --hash={HASH}\n'
        f'old-only==1.0 ; python_version < "3" --hash={HASH}\n'
    )
    directory = _plugin(tmp_path, lock)
    (plugin,), errors = find_plugins(directory)
    assert errors == []
    assert plugin.requirements.lock == (
        f"six==1.17.0 --hash={HASH} --hash={other}\ntomli-w==1.2.0 --hash={HASH}\n"
    )


@pytest.mark.parametrize(
    ("dependency", "expected"),
    [
        ("evil @ https://evil.example/evil-1.0.tar.gz", "direct reference"),
        ("evil @ file:///tmp/evil", "direct reference"),
        ("--no-binary=:all:", "installer option"),
        ("-r/etc/shadow", "installer option"),
        ("six==1.17.0\n--no-binary six", "control characters"),
    ],
)
def test_manifest_dependencies_are_names_and_specifiers_only(
    tmp_path: Path, dependency: str, expected: str
) -> None:
    import json

    directory = _plugin(tmp_path, dependencies=json.dumps([dependency]))
    with pytest.raises(ManifestError, match="dependencies") as caught:
        load_manifest(directory / "plugin.toml")
    assert expected in str(caught.value)
    assert expected in _load_error(directory)


def test_pyproject_dependencies_are_checked_the_same_way(tmp_path: Path) -> None:
    directory = _plugin(tmp_path)
    (directory / "pyproject.toml").write_text(
        '[project]\ndependencies = ["evil @ https://evil.example/evil.tar.gz"]\n'
    )
    error = _load_error(directory)
    assert "pyproject.toml" in error and "direct reference" in error


def test_a_lock_handed_over_unchecked_never_starts_the_installer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defence in depth: a Requirements built elsewhere, with a raw lock, is
    # checked again before anything is started.
    started: list[object] = []
    monkeypatch.setattr("host.installer.run_confined", lambda *a, **k: started.append(a))
    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: started.append(a))
    store = EnvironmentStore(tmp_path / "envs")
    raw = Requirements((), f"--no-binary six\n{GOOD}", "x/requirements.lock")
    state = store.prepare("x", raw)
    assert state.status is EnvStatus.FAILED
    assert "line 1" in state.message and "--no-binary" in state.message
    assert started == []


@pytest.mark.parametrize("case", ["no_binary", "find_links", "include", "constraint", "url"])
def test_plughost_check_names_the_line_of_a_refused_lock_and_never_starts_the_installer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    import io

    from host.authoring import check_plugin

    started: list[object] = []
    monkeypatch.setattr("host.installer.run_confined", lambda *a, **k: started.append(a))
    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: started.append(a))
    line, expected = REFUSED[case]
    directory = _plugin(tmp_path, f"# lock\n{line}\n", dependencies='["six"]')
    out = io.StringIO()
    status = check_plugin(
        directory, [], EnvironmentStore(tmp_path / "envs"), lambda registry: None, out
    )
    assert status == 1
    report = out.getvalue()
    assert f"{directory / 'requirements.lock'}: line 2: " in report, report
    assert expected in report
    assert started == []
