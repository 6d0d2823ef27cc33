"""Finding plugins: bundled ones, extra directories and installed distributions.

Plugin names are unique. Discovery looks in a fixed order (bundled plugins,
then each extra directory in the order given, then entry points) and the
first plugin found with a name keeps it; a later one claiming the same name
is a load error naming both directories and is never registered. Only the
operator's configuration (`plugin_overrides`: name -> the directory whose
plugin wins) changes that.

No plugin code is imported here. An entry point of the group
`plughost.plugins` names either a plugin directory (a path) or a
`module:attribute`; for the latter the module's file is located without
executing it, and a `plugin.toml` must sit beside it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jsonschema

from host.environments import PrepareError
from host.manifest import Manifest, ManifestError, load_manifest
from host.requirements import Requirements, RequirementsError, read_requirements
from sandbox.limits import PluginLimits


@dataclass(frozen=True)
class RegisteredPlugin:
    """A plugin the host can run: its manifest and where its code lives
    (what the sandbox's `RunnablePlugin` asks for)."""

    manifest: Manifest
    directory: Path
    source: str = "directory"
    # Where the entrypoint's module is imported from, when that is not the
    # plugin's directory: the parent of an installed plugin package.
    import_root: Path | None = None
    # What the plugin imports besides the standard library (host.environments).
    requirements: Requirements = Requirements()

    @property
    def name(self) -> str:
        return self.manifest.name

    def options_problem(self, options: dict[str, Any]) -> str | None:
        """What is wrong with a call's options under the manifest's schema."""
        schema = self.manifest.options
        if schema is None:
            return None
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(schema).iter_errors(options)
        )
        if error is None:
            return None
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        return f"options{where}: {error.message}"[:500]

    @property
    def entrypoint(self) -> str:
        return self.manifest.entrypoint

    @property
    def limits(self) -> PluginLimits:
        return self.manifest.plugin_limits


class Registrar(Protocol):
    """Where `discover` puts what it finds (the host's `PluginRegistry`)."""

    load_errors: list[str]

    def register(self, name: str, plugin: RegisteredPlugin) -> None: ...


def _bundled_dir() -> Path:
    """`plugins/` beside the source tree, or the `plughost_plugins` data
    package an installed wheel carries (the same files)."""
    source = Path(__file__).resolve().parent.parent / "plugins"
    if source.is_dir():
        return source
    spec = importlib.util.find_spec("plughost_plugins")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return source  # reported as missing by whoever looks in it


BUNDLED_DIR = _bundled_dir()
ENTRY_POINT_GROUP = "plughost.plugins"
MANIFEST = "plugin.toml"


def find_plugins(path: Path) -> tuple[list[RegisteredPlugin], list[str]]:
    """Plugins in `path` and in its direct subdirectories, plus load errors."""
    candidates = [path] if (path / MANIFEST).is_file() else []
    if path.is_dir():
        candidates += sorted(p for p in path.iterdir() if (p / MANIFEST).is_file())
    elif not path.exists():
        return [], [f"{path}: plugin directory does not exist"]
    found: dict[str, RegisteredPlugin] = {}
    errors: list[str] = []
    for directory in candidates:
        try:
            manifest = load_manifest(directory / MANIFEST)
        except ManifestError as exc:
            errors.append(str(exc))
            continue
        try:
            plugin = _registered(manifest, directory / MANIFEST, directory, "directory")
        except ManifestError as exc:
            errors.append(str(exc))
            continue
        if manifest.name in found:
            errors.append(name_taken(plugin, found[manifest.name]))
            continue
        found[manifest.name] = plugin
    return list(found.values()), errors


def _registered(
    manifest: Manifest, path: Path, directory: Path, source: str, import_root: Path | None = None
) -> RegisteredPlugin:
    """The registry's entry for a valid manifest, with the requirements beside it."""
    try:
        requirements = read_requirements(path.parent, manifest.dependencies, path.name)
    except RequirementsError as exc:  # names its own file and line
        where = f"line {exc.line}: " if exc.line else ""
        raise ManifestError(exc.path, f"{where}{exc.problem}") from exc
    except (PrepareError, OSError, ValueError) as exc:
        raise ManifestError(path, f"requirements: {exc}") from exc
    root = import_root.resolve() if import_root is not None else None
    return RegisteredPlugin(manifest, directory.resolve(), source, root, requirements)


def name_taken(refused: RegisteredPlugin, holder: RegisteredPlugin) -> str:
    """The load error of `refused`, whose name `holder` keeps."""
    return (
        f"{refused.directory / MANIFEST}: field 'name': {refused.name!r} is already "
        f"registered by {holder.directory}; {refused.directory} is not loaded "
        f"(plugin_overrides in the configuration chooses another winner)"
    )


def _entry_point_plugin(entry: importlib.metadata.EntryPoint) -> RegisteredPlugin:
    """The plugin an entry point names: a directory, or `package.module:Class`.

    For `module:attribute`, the top-level package is the plugin's directory
    (the only part of site-packages its calls see), its `plugin.toml` sits
    beside the module, and the manifest's entrypoint is the entry point's
    value. The module's file is located without executing it.
    """
    value = entry.value.strip()
    if ":" not in value:
        directory = Path(value)
        manifest = load_manifest(directory / MANIFEST)
        return _registered(manifest, directory / MANIFEST, directory, "entry_point")
    module = value.split(":")[0]
    top = module.split(".")[0]
    spec = importlib.util.find_spec(top)  # top-level lookup only: runs no plugin code
    if spec is None or spec.origin is None or not spec.submodule_search_locations:
        shipped = _distribution_of(entry)
        raise ManifestError(
            Path(entry.name),
            f"entry point {entry.name} = {value!r}{shipped}: package {top!r} is not "
            "installed as a package (a plugin distribution ships a package directory "
            "holding the module and its plugin.toml)",
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package.parent
    module_path = root.joinpath(*module.split("."))
    manifest_dir = module_path if module_path.is_dir() else module_path.parent
    try:
        manifest = load_manifest(manifest_dir / MANIFEST, code_dir=root, expect=value)
    except ManifestError as exc:
        raise ManifestError(
            exc.path, f"{exc.message} (entry point {entry.name}{_distribution_of(entry)})"
        ) from exc
    return _registered(manifest, manifest_dir / MANIFEST, package, "entry_point", root)


def _distribution_of(entry: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    return f" of {dist.name} {dist.version}" if dist is not None else ""


def _unique(
    candidates: list[RegisteredPlugin], overrides: Mapping[str, str | Path]
) -> tuple[list[RegisteredPlugin], list[str]]:
    """Keep one plugin per name: the override's directory, else the first found."""
    chosen: dict[str, RegisteredPlugin] = {}
    errors: list[str] = []
    wanted = {name: Path(directory).resolve() for name, directory in overrides.items()}
    for name, directory in list(wanted.items()):
        if not any(p.name == name and p.directory == directory for p in candidates):
            errors.append(
                f"plugin_overrides: {name!r} = {str(directory)!r}: no plugin of that name "
                "was found in that directory; the first one found keeps the name"
            )
            del wanted[name]
    for plugin in candidates:
        if wanted.get(plugin.name, plugin.directory) != plugin.directory:
            continue  # the operator chose another directory for this name
        holder = chosen.get(plugin.name)
        if holder is None:
            chosen[plugin.name] = plugin
        elif holder.directory != plugin.directory:
            errors.append(name_taken(plugin, holder))
    for plugin in candidates:
        winner = chosen[plugin.name]
        if plugin.name in wanted and plugin.directory != winner.directory:
            errors.append(
                f"{plugin.directory / MANIFEST}: field 'name': {plugin.name!r} is registered "
                f"from {winner.directory} (plugin_overrides); {plugin.directory} is not loaded"
            )
    return list(chosen.values()), errors


def discover(
    registry: Registrar,
    extra_dirs: Iterable[str | Path] = (),
    overrides: Mapping[str, str | Path] | None = None,
) -> list[str]:
    """Register bundled plugins, `extra_dirs` and entry-point plugins; return the names.

    The first plugin found with a name keeps it (bundled, then `extra_dirs`
    in order, then entry points), unless `overrides` maps the name to the
    directory of another one. Every plugin that loses its name, and every
    bad manifest, is reported in `registry.load_errors` and not registered.
    A plugin registered before under a winning name is replaced (a reload).
    """
    candidates: list[RegisteredPlugin] = []
    errors: list[str] = []
    for directory in [BUNDLED_DIR, *extra_dirs]:
        found, problems = find_plugins(Path(directory))
        candidates += found
        errors += problems
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            candidates.append(_entry_point_plugin(entry))
        except ManifestError as exc:
            errors.append(f"entry point {entry.name!r}: {exc}")
    winners, conflicts = _unique(candidates, overrides or {})
    registry.load_errors.extend(errors + conflicts)
    for plugin in winners:
        registry.register(plugin.name, plugin)
    return [plugin.name for plugin in winners]
