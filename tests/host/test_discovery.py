"""Discovery: bundled plugins, extra directories and the `plughost.plugins`
entry-point group, none of which imports plugin code in the host."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from host.discovery import discover
from host.registry import PluginRegistry
from sandbox.tool_runner import ToolRunner


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "site"
    root.mkdir()
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    yield root
    sys.path.remove(str(root))
    importlib.invalidate_caches()


def _distribution(site: Path, entry_points: str) -> None:
    info = site / "thirdparty_plugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: thirdparty-plugins\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text("[plughost.plugins]\n" + entry_points)


def test_bundled_plugins_are_discovered() -> None:
    registry = PluginRegistry()
    names = discover(registry)
    assert {"image_info", "image_hash", "dominant_colors"} <= set(names)
    assert not any(name in names for name in ("busy_loop", "segfault"))  # hostile stay apart


def test_entry_point_module_plugin_is_found_and_runs_in_the_sandbox(
    site: Path, registry: PluginRegistry, payload: dict
) -> None:
    package = site / "tp_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "core.py").write_text(
        "class Plugin:\n    def run(self, payload):\n        return {'from': 'entry point'}\n"
    )
    (package / "plugin.toml").write_text(
        'name = "tp_module"\nversion = "1.0"\nentrypoint = "tp_pkg.core:Plugin"\n'
    )
    _distribution(site, "tp_module = tp_pkg.core:Plugin\n")
    assert "tp_module" in discover(registry)
    assert "tp_pkg" not in sys.modules  # found without importing plugin code
    result, error = ToolRunner().run("tp_module", payload)
    assert error == {} and result == {"from": "entry point"}


def test_entry_point_directory_plugin_is_found(site: Path, tmp_path: Path) -> None:
    directory = tmp_path / "dirplugin"
    directory.mkdir()
    (directory / "plugin.toml").write_text('name = "tp_dir"\nversion = "1"\nentrypoint = "m:C"\n')
    (directory / "m.py").write_text("")
    _distribution(site, f"tp_dir = {directory}\n")
    registry = PluginRegistry()
    assert "tp_dir" in discover(registry)


def test_broken_entry_point_is_reported_and_others_still_load(site: Path) -> None:
    _distribution(site, "ghost = not_installed_anywhere.mod:Plugin\n")
    registry = PluginRegistry()
    names = discover(registry)
    assert "image_info" in names
    assert any("ghost" in e and "not_installed_anywhere" in e for e in registry.load_errors)


def test_extra_directory_is_added_to_the_bundled_plugins(tmp_path: Path) -> None:
    directory = tmp_path / "extra"
    directory.mkdir()
    (directory / "plugin.toml").write_text('name = "extra"\nversion = "1"\nentrypoint = "m:C"\n')
    (directory / "m.py").write_text("")
    registry = PluginRegistry()
    names = discover(registry, [tmp_path])
    assert "extra" in names and "image_info" in names


def test_missing_extra_directory_is_a_load_error(tmp_path: Path) -> None:
    registry = PluginRegistry()
    discover(registry, [tmp_path / "nowhere"])
    assert any("does not exist" in e for e in registry.load_errors)
