"""A plugin's modules compiled once by the host (host/bytecode.py): its
calls import the bytecode, and the host writes nowhere a plugin author could
have pointed it."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from host.bytecode import compile_plugin
from host.preparation import prepare_all
from host.registry import PluginRegistry
from sandbox.tool_runner import ToolRunner
from tests.conftest import write_plugin

BODY = "return {'v': 1}"


def _cached(source: Path) -> Path:
    return Path(importlib.util.cache_from_source(str(source)))


def _swap_source_keeping_its_stamp(source: Path) -> None:
    """New code of the same size and mtime: only an import that reads the
    bytecode still runs the old code."""
    stamp = source.stat()
    source.write_text(source.read_text().replace("'v': 1", "'v': 2"))
    os.utime(source, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


@pytest.mark.parametrize("compiled", [True, False])
def test_a_call_imports_the_bytecode_the_host_wrote(
    compiled: bool, registry: PluginRegistry, sandbox, tmp_path: Path, payload: dict
) -> None:
    directory = write_plugin(tmp_path, "precompiled", BODY)
    source = directory / "precompiled_mod.py"
    if compiled:
        assert compile_plugin(directory) == 1
        assert _cached(source).stat().st_mode & 0o777 == 0o644
    _swap_source_keeping_its_stamp(source)
    registry.load_directory(directory)
    result, error = ToolRunner(registry, sandbox).run("precompiled", payload)
    assert error == {}
    # Without the host's bytecode the call can write none (its directory is
    # read-only to it) and compiles the source it finds.
    assert result == {"v": 1 if compiled else 2}


def test_only_stale_or_missing_bytecode_is_written(tmp_path: Path) -> None:
    directory = write_plugin(tmp_path, "again", BODY)
    (directory / "helpers").mkdir()
    (directory / "helpers" / "more.py").write_text("X = 1\n")
    (directory / "broken.py").write_text("def (:\n")
    assert compile_plugin(directory) == 2  # the plugin's module and helpers/more.py
    assert compile_plugin(directory) == 0
    source = directory / "helpers" / "more.py"
    source.write_text("X = 22\n")
    assert compile_plugin(directory) == 1
    assert not _cached(directory / "broken.py").exists()


def test_nothing_is_written_through_a_link_or_where_others_could_write(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    linked_cache = write_plugin(tmp_path / "a", "linked_cache", BODY)
    (linked_cache / "__pycache__").symlink_to(elsewhere)
    linked_source = write_plugin(tmp_path / "b", "linked_source", BODY)
    outside = elsewhere / "secret_settings.py"
    outside.write_text("TOKEN = 'not for plugins'\n")
    (linked_source / "settings.py").symlink_to(outside)
    linked_dir = write_plugin(tmp_path / "c", "linked_dir", BODY)
    (linked_dir / "pkg").symlink_to(elsewhere)
    open_dir = write_plugin(tmp_path / "d", "open_dir", BODY)
    open_dir.chmod(0o777)
    private = write_plugin(tmp_path / "e", "private", BODY)
    (private / "credentials.py").write_text("TOKEN = 'the operator keeps this to root'\n")
    (private / "credentials.py").chmod(0o600)
    assert compile_plugin(linked_cache) == 0
    assert compile_plugin(linked_source) == 1  # its own module only
    assert compile_plugin(linked_dir) == 1
    assert compile_plugin(open_dir) == 0
    assert compile_plugin(private) == 1  # not the file only root may read
    assert not _cached(private / "credentials.py").exists()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["secret_settings.py"]
    assert not _cached(linked_source / "settings.py").exists()
    assert not (open_dir / "__pycache__").exists()


def test_preparation_compiles_plugins_without_packages(tmp_path: Path) -> None:
    directory = write_plugin(tmp_path, "plain", BODY)
    registry = PluginRegistry()
    registry.load_directory(directory)
    assert registry.environments is None
    prepare_all(registry)
    assert _cached(directory / "plain_mod.py").is_file()
