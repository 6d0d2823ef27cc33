"""Finding plugins: bundled ones, extra directories and installed distributions.

No plugin code is imported here. An entry point of the group
`plughost.plugins` names either a plugin directory (a path) or a
`module:attribute`; for the latter the module's file is located without
executing it, and a `plugin.toml` must sit beside it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Iterable
from pathlib import Path

from host.manifest import ManifestError, load_manifest
from host.registry import PluginRegistry, RegisteredPlugin

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "plugins"
ENTRY_POINT_GROUP = "plughost.plugins"
MANIFEST = "plugin.toml"


def find_plugins(path: Path) -> tuple[list[RegisteredPlugin], list[str]]:
    """Plugins in `path` and in its direct subdirectories, plus load errors."""
    candidates = [path] if (path / MANIFEST).is_file() else []
    if path.is_dir():
        candidates += sorted(p for p in path.iterdir() if (p / MANIFEST).is_file())
    elif not path.exists():
        return [], [f"{path}: plugin directory does not exist"]
    found: list[RegisteredPlugin] = []
    errors: list[str] = []
    seen: set[str] = set()
    for directory in candidates:
        try:
            manifest = load_manifest(directory / MANIFEST)
        except ManifestError as exc:
            errors.append(str(exc))
            continue
        if manifest.name in seen:
            errors.append(f"{directory / MANIFEST}: field 'name': {manifest.name!r} is taken")
            continue
        seen.add(manifest.name)
        found.append(RegisteredPlugin(manifest=manifest, directory=directory.resolve()))
    return found, errors


def _entry_point_plugin(entry: importlib.metadata.EntryPoint) -> RegisteredPlugin:
    value = entry.value.strip()
    if ":" not in value:
        directory = Path(value)
        return RegisteredPlugin(
            load_manifest(directory / MANIFEST), directory.resolve(), "entry_point"
        )
    module = value.split(":")[0]
    top = module.split(".")[0]
    spec = importlib.util.find_spec(top)  # top-level lookup only: runs no plugin code
    if spec is None or spec.origin is None:
        raise ManifestError(Path(entry.name), f"entry point module '{top}' is not installed")
    origin = Path(spec.origin)
    root = origin.parent.parent if origin.name == "__init__.py" else origin.parent
    module_path = root.joinpath(*module.split("."))
    manifest_dir = module_path if module_path.is_dir() else module_path.parent
    manifest = load_manifest(manifest_dir / MANIFEST, code_dir=root)
    if manifest.entrypoint != value:
        raise ManifestError(
            manifest_dir / MANIFEST,
            f"field 'entrypoint': {manifest.entrypoint!r} != entry point {value!r}",
        )
    return RegisteredPlugin(manifest, root.resolve(), "entry_point")


def discover(registry: PluginRegistry, extra_dirs: Iterable[str | Path] = ()) -> list[str]:
    """Register bundled plugins, `extra_dirs` and entry-point plugins; return the names."""
    names = registry.load_directory(BUNDLED_DIR)
    for directory in extra_dirs:
        names += registry.load_directory(directory)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            plugin = _entry_point_plugin(entry)
        except ManifestError as exc:
            registry.load_errors.append(f"entry point {entry.name!r}: {exc}")
            continue
        registry.register(plugin.name, plugin)
        names.append(plugin.name)
    return names
