"""Discovery: bundled plugins, extra directories and the `plughost.plugins`
entry-point group, none of which imports plugin code in the host."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from host.config import load_settings
from host.discovery import BUNDLED_DIR, discover
from host.registry import PluginRegistry
from sandbox.tool_runner import ToolRunner
from tests.conftest import HOSTILE_DIR, write_plugin


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
    runner: ToolRunner, site: Path, registry: PluginRegistry, payload: dict
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
    plugin = registry.get_plugin("tp_module")
    assert plugin.directory == package.resolve()  # its own package, not site-packages
    result, error = runner.run("tp_module", payload)
    assert error == {} and result == {"from": "entry point"}


def test_an_entry_point_plugin_sees_its_package_and_nothing_else_of_site_packages(
    runner: ToolRunner, site: Path, registry: PluginRegistry, payload: dict
) -> None:
    (site / "neighbour").mkdir()
    (site / "neighbour" / "__init__.py").write_text("")
    package = site / "tp_alone"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import importlib, os\n\n\nclass Plugin:\n    def run(self, payload):\n"
        "        try:\n            importlib.import_module('neighbour')\n"
        "            neighbour = True\n        except ImportError:\n            neighbour = False\n"
        "        here = os.path.dirname(os.path.dirname(__file__))\n"
        "        return {'neighbour': neighbour, 'site': sorted(os.listdir(here))}\n"
    )
    (package / "plugin.toml").write_text(
        'name = "tp_alone"\nversion = "1.0"\nentrypoint = "tp_alone:Plugin"\n'
    )
    _distribution(site, "tp_alone = tp_alone:Plugin\n")
    assert "tp_alone" in discover(registry)
    result, error = runner.run("tp_alone", payload)
    assert error == {}
    assert result == {"neighbour": False, "site": ["tp_alone"]}


def test_an_entry_point_and_its_manifest_disagreeing_says_what_to_change(site: Path) -> None:
    package = site / "tp_other"
    package.mkdir()
    (package / "__init__.py").write_text("class Plugin:\n    pass\n")
    (package / "plugin.toml").write_text(
        'name = "tp_other"\nversion = "1.0"\nentrypoint = "plugin:Plugin"\n'
    )
    (package / "plugin.py").write_text("class Plugin:\n    pass\n")
    _distribution(site, "tp_other = tp_other:Plugin\n")
    registry = PluginRegistry()
    assert "tp_other" not in discover(registry)
    [problem] = [e for e in registry.load_errors if "tp_other" in e]
    assert str(package / "plugin.toml") in problem
    assert "thirdparty-plugins 1.0" in problem
    assert 'set entrypoint = "tp_other:Plugin" in this file' in problem


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


# -- plugin names are unique ----------------------------------------------------


@pytest.fixture
def impostor(tmp_path: Path) -> Path:
    """A plugins directory holding a plugin that claims the bundled `image_info`."""
    write_plugin(tmp_path / "extra", "image_info", "return {'impostor': True}")
    return tmp_path / "extra"


def test_plugin_claiming_a_bundled_name_is_refused_naming_both_directories(
    runner: ToolRunner, registry: PluginRegistry, impostor: Path, payload: dict
) -> None:
    registry.clear()
    names = discover(registry, [HOSTILE_DIR, impostor])
    assert names.count("image_info") == 1
    assert registry.get_plugin("image_info").directory == BUNDLED_DIR / "image_info"
    [problem] = [e for e in registry.load_errors if "'image_info'" in e]
    assert str(impostor / "image_info") in problem and str(BUNDLED_DIR / "image_info") in problem
    result, error = runner.run("image_info", payload)
    assert error == {} and "impostor" not in result  # the bundled plugin still answers


def test_first_plugins_dir_keeps_a_name_the_next_one_claims(tmp_path: Path) -> None:
    first = write_plugin(tmp_path / "one", "twin", "return {}")
    second = write_plugin(tmp_path / "two", "twin", "return {}")
    registry = PluginRegistry()
    assert discover(registry, [tmp_path / "one", tmp_path / "two"]).count("twin") == 1
    assert registry.get_plugin("twin").directory == first
    assert any(str(first) in e and str(second) in e for e in registry.load_errors)


def test_entry_point_cannot_take_a_bundled_name(site: Path, tmp_path: Path) -> None:
    directory = write_plugin(tmp_path, "image_info", "return {}")
    _distribution(site, f"image_info = {directory}\n")
    registry = PluginRegistry()
    discover(registry)
    assert registry.get_plugin("image_info").directory == BUNDLED_DIR / "image_info"
    assert any(str(directory) in e and str(BUNDLED_DIR) in e for e in registry.load_errors)


def test_load_directory_refuses_a_name_registered_from_another_directory(
    registry: PluginRegistry, impostor: Path
) -> None:
    assert registry.load_directory(impostor) == []
    assert registry.get_plugin("image_info").directory == BUNDLED_DIR / "image_info"
    assert any(str(impostor / "image_info") in e for e in registry.load_errors)
    # The same directory again is the same plugin, registered anew.
    assert registry.load_directory(BUNDLED_DIR / "image_info") == ["image_info"]


def test_operator_override_chooses_which_plugin_keeps_the_name(
    runner: ToolRunner, registry: PluginRegistry, impostor: Path, payload: dict
) -> None:
    registry.clear()
    discover(registry, [impostor], overrides={"image_info": str(impostor / "image_info")})
    assert registry.get_plugin("image_info").directory == impostor / "image_info"
    assert any(str(BUNDLED_DIR / "image_info") in e for e in registry.load_errors)
    result, error = runner.run("image_info", payload)
    assert error == {} and result == {"impostor": True}


def test_override_naming_no_such_plugin_is_reported_and_changes_nothing(
    impostor: Path, tmp_path: Path
) -> None:
    registry = PluginRegistry()
    discover(registry, [impostor], overrides={"image_info": str(tmp_path / "elsewhere")})
    assert registry.get_plugin("image_info").directory == BUNDLED_DIR / "image_info"
    assert any("plugin_overrides" in e and "elsewhere" in e for e in registry.load_errors)


def test_overrides_come_from_the_environment() -> None:
    environ = {"PLUGHOST_PLUGIN_OVERRIDES": "image_info=/srv/a, image_hash=/srv/b"}
    settings = load_settings(environ=environ)
    assert settings.plugin_overrides == {"image_info": "/srv/a", "image_hash": "/srv/b"}
