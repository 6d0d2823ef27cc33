"""Manifest validation names the file and the field that is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from host.manifest import ManifestError, load_manifest


def _write(tmp_path: Path, text: str, module: bool = True) -> Path:
    (tmp_path / "plugin.toml").write_text(text)
    if module:
        (tmp_path / "mod.py").write_text("")
    return tmp_path / "plugin.toml"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('version = "1"\nentrypoint = "mod:C"\n', "name"),
        ('name = "x"\nversion = "1"\nentrypoint = "no colon"\n', "entrypoint"),
        (
            'name = "x"\nversion = "1"\nentrypoint = "mod:C"\n[limits]\ntimeout_s = -1\n',
            "limits.timeout_s",
        ),
        (
            'name = "x"\nversion = "1"\nentrypoint = "mod:C"\n[limits]\nmemory_mb = "lots"\n',
            "limits.memory_mb",
        ),
        ('name = "x"\nversion = "1"\nentrypoint = "mod:C"\ncolour = "red"\n', "colour"),
        ('name = "x"\nversion = "1"\nentrypoint = "other:C"\n', "entrypoint"),
        ('name = "' + "a" * 65 + '"\nversion = "1"\nentrypoint = "mod:C"\n', "name"),
    ],
)
def test_bad_manifest_names_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(path) in str(info.value)
    assert f"field '{field}'" in str(info.value)


def test_valid_manifest_loads_with_limits(tmp_path: Path) -> None:
    path = _write(
        tmp_path, 'name = "x-1"\nversion = "1"\nentrypoint = "mod:C"\n[limits]\ntimeout_s = 2\n'
    )
    manifest = load_manifest(path)
    assert manifest.name == "x-1" and manifest.plugin_limits.timeout_s == 2
    assert manifest.plugin_limits.memory_mb is None
