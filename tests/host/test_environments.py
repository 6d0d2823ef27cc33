"""Plugin environments, prepared for real with uv from the package index.

Small wheel-only packages keep these fast: `six` in two versions (a conflict
two plugins must both get), and `tomli-w`. uv's own cache makes a second
preparation of the same set cheap.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from host.environments import (
    BY_SPEC,
    CACHE,
    COMPILED,
    EnvironmentStore,
    EnvStatus,
    Requirements,
    find_uv,
    read_requirements,
)

pytestmark = pytest.mark.timeout(300)


def _environments(tmp_path: Path) -> list[Path]:
    """The environment directories (not the records, not the download cache)."""
    return [p for p in (tmp_path / "envs").iterdir() if p.name not in (BY_SPEC, CACHE)]


def _store(tmp_path: Path, allow_sdist: tuple[str, ...] = ()) -> EnvironmentStore:
    return EnvironmentStore(tmp_path / "envs", allow_sdist=allow_sdist)


def test_uv_is_what_prepares() -> None:
    assert find_uv() is not None, "uv is a dependency of plughost and must be found"


def test_two_plugins_get_their_own_conflicting_versions(tmp_path: Path) -> None:
    store = _store(tmp_path)
    old = Requirements(("six==1.16.0",), source="old/plugin.toml")
    new = Requirements(("six==1.17.0",), source="new/plugin.toml")
    assert store.state("old", old).status is EnvStatus.MISSING
    first, second = store.prepare("old", old), store.prepare("new", new)
    assert first.status is EnvStatus.READY, first.message
    assert second.status is EnvStatus.READY, second.message
    assert first.path != second.path
    assert first.packages == ["six==1.16.0"] and second.packages == ["six==1.17.0"]
    for state, version in ((first, "1.16.0"), (second, "1.17.0")):
        assert state.path is not None
        where = str(state.path)
        probe = f"import sys; sys.path.insert(0, {where!r}); import six; print(six.__version__)"
        out = subprocess.run(
            [sys.executable, "-I", "-c", probe],
            env={},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert out.stdout.strip() == version
    assert store.state("old", old).status is EnvStatus.READY


def test_one_resolved_set_is_one_directory(tmp_path: Path) -> None:
    store = _store(tmp_path)
    a = store.prepare("a", Requirements(("six==1.17.0",), source="a"))
    b = store.prepare("b", Requirements(("six>=1.17,<1.18",), source="b"))
    assert a.status is b.status is EnvStatus.READY
    assert a.path == b.path
    assert len(_environments(tmp_path)) == 1


def test_a_package_that_does_not_exist_fails_with_its_name(tmp_path: Path) -> None:
    store = _store(tmp_path)
    wanted = Requirements(("plughost-no-such-package-7f3a==1.0",), source="x/plugin.toml")
    state = store.prepare("x", wanted)
    assert state.status is EnvStatus.FAILED
    assert "x/plugin.toml" in state.message and "plughost-no-such-package-7f3a" in state.message
    assert store.state("x", wanted).status is EnvStatus.FAILED
    assert _environments(tmp_path) == []


def _wheel_hash(tmp_path: Path, requirement: str) -> str:
    uv = find_uv()
    assert uv is not None
    out = tmp_path / "dl"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        + ["-d", str(out), requirement],
        capture_output=True,
        timeout=120,
        check=True,
    )
    (wheel,) = out.glob("*.whl")
    return hashlib.sha256(wheel.read_bytes()).hexdigest()


def test_a_lock_is_installed_with_its_hashes_checked(tmp_path: Path) -> None:
    plugin = tmp_path / "locked"
    plugin.mkdir()
    good = _wheel_hash(tmp_path, "tomli-w==1.2.0")
    (plugin / "requirements.lock").write_text(f"tomli-w==1.2.0 --hash=sha256:{good}\n")
    requirements = read_requirements(plugin, ["tomli-w"])
    assert requirements.lock is not None
    state = _store(tmp_path).prepare("locked", requirements)
    assert state.status is EnvStatus.READY, state.message
    assert state.packages == ["tomli-w==1.2.0"]
    (plugin / "requirements.lock").write_text(f"tomli-w==1.2.0 --hash=sha256:{'0' * 64}\n")
    tampered = _store(tmp_path / "other").prepare("locked", read_requirements(plugin))
    assert tampered.status is EnvStatus.FAILED
    assert "hash" in tampered.message.lower()


def test_dependencies_from_a_pyproject_beside_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["six==1.17.0"]\n')
    requirements = read_requirements(tmp_path)
    assert requirements.dependencies == ("six==1.17.0",)
    assert requirements.source.endswith("pyproject.toml")
    assert read_requirements(tmp_path, ["tomli-w"]).dependencies == ("tomli-w",)


def test_collect_removes_what_no_plugin_uses(tmp_path: Path) -> None:
    store = _store(tmp_path)
    kept_req = Requirements(("six==1.17.0",), source="k")
    gone_req = Requirements(("six==1.16.0",), source="g")
    kept, gone = store.prepare("k", kept_req), store.prepare("g", gone_req)
    assert kept.path is not None and gone.path is not None
    assert store.collect([store.key_for("k", kept_req)]) == []  # within the grace period
    removed = store.collect([store.key_for("k", kept_req)], grace_s=0)
    assert removed == [gone.path.name]
    assert kept.path.is_dir() and not gone.path.exists()
    assert store.state("g", gone_req).status is EnvStatus.MISSING
    assert store.state("k", kept_req).status is EnvStatus.READY


def test_environments_are_readable_by_every_call_uid(tmp_path: Path) -> None:
    state = _store(tmp_path).prepare("r", Requirements(("six==1.17.0",), source="r"))
    assert state.path is not None
    for path in [state.path, *state.path.rglob("*")]:
        mode = path.stat().st_mode
        assert mode & 0o004, f"{path} is not world-readable"
        assert not mode & 0o022, f"{path} is writable by others"


def test_pip_prepares_where_uv_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("host.installer.find_uv", lambda: None)
    lines: list[str] = []
    state = _store(tmp_path).prepare("p", Requirements(("six==1.17.0",), source="p"), lines.append)
    assert state.status is EnvStatus.READY, state.message
    assert state.packages == ["six==1.17.0"]
    assert any("Successfully installed six" in line for line in lines)  # pip's words, not uv's


def _uncompiled(root: Path) -> list[Path]:
    """Modules under `root` without this interpreter's bytecode beside them."""
    return [
        source
        for source in root.rglob("*.py")
        if not Path(importlib.util.cache_from_source(str(source))).is_file()
    ]


def test_an_environment_holds_the_bytecode_of_its_modules(tmp_path: Path) -> None:
    # A call's child reads the environment read-only and cannot write bytecode:
    # without it, every call would compile every module it imports again.
    store = _store(tmp_path)
    requirements = Requirements(("six==1.17.0",), source="c")
    state = store.prepare("c", requirements)
    assert state.path is not None and list(state.path.rglob("*.py"))
    assert _uncompiled(state.path) == []
    # One prepared before that (no bytecode) is compiled when next prepared.
    for cache in list(state.path.rglob("__pycache__")):
        shutil.rmtree(cache)
    (state.path / COMPILED).unlink()
    assert _uncompiled(state.path)
    assert store.prepare("c", requirements).path == state.path
    assert _uncompiled(state.path) == []


def test_an_environment_in_use_is_kept_by_another_hosts_collect(tmp_path: Path) -> None:
    # Two hosts share the directory: this one prepared `used` long ago and
    # still runs calls with it; the other host's plugins do not use it.
    store = _store(tmp_path)
    requirements = Requirements(("six==1.17.0",), source="u")
    ready = store.prepare("used", requirements)
    assert ready.path is not None
    record = tmp_path / "envs" / BY_SPEC / f"{store.key_for('used', requirements)}.json"
    hours_ago = time.time() - 7200
    os.utime(record, (hours_ago, hours_ago))
    assert store.state("used", requirements).status is EnvStatus.READY  # a call reads it
    other_host = _store(tmp_path)
    assert other_host.collect([]) == []
    assert ready.path.is_dir()
    assert store.state("used", requirements).status is EnvStatus.READY


def test_collect_never_removes_an_environment_a_preparation_just_found_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One host's preparation finds its environment ready; before it marks it
    # in use, another host sharing the directory collects what its own
    # plugins do not use. The first host must not be handed a removed directory.
    store = _store(tmp_path)
    requirements = Requirements(("six==1.17.0",), source="p")
    first = store.prepare("p", requirements)
    assert first.path is not None
    record = tmp_path / "envs" / BY_SPEC / f"{store.key_for('p', requirements)}.json"
    hours_ago = time.time() - 7200
    os.utime(record, (hours_ago, hours_ago))
    found_ready, go_on = threading.Event(), threading.Event()
    touch = EnvironmentStore.touch

    def slow_touch(self: EnvironmentStore, plugin: str, req: Requirements) -> None:
        found_ready.set()
        assert go_on.wait(30)
        touch(self, plugin, req)

    monkeypatch.setattr(EnvironmentStore, "touch", slow_touch)
    with ThreadPoolExecutor(1) as pool:
        preparing = pool.submit(store.prepare, "p", requirements)
        assert found_ready.wait(30)
        _store(tmp_path).collect([])  # the other host
        go_on.set()
        state = preparing.result(timeout=60)
    assert state.status is EnvStatus.READY and state.path is not None
    assert (state.path / "six.py").is_file(), "READY answered for a removed directory"
