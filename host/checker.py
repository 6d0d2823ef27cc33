"""`plughost check DIR`, the static half: every problem of a plugin directory
that can be found without running it, each naming the file and what to change.

Nothing here imports or executes the plugin's code: the module is parsed
(`ast`), never imported. The running half (prepare the environment, call the
plugin in the sandbox on sample images) builds on these results.
"""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from host.manifest import Manifest, describe_errors
from sandbox.limits import HostLimits

MANIFEST = "plugin.toml"


@dataclass(frozen=True)
class Problem:
    """One thing wrong, where it is, and what to change."""

    file: Path
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{where}: {self.message}"


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, list[Problem]]:
    if not path.is_file():
        return None, [Problem(path, "missing: a plugin directory needs a plugin.toml")]
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream), []
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        line = int(found[1]) if found else None
        return None, [Problem(path, f"is not valid TOML: {exc}", line)]


def _module_file(directory: Path, module: str) -> Path | None:
    parts = module.split(".")
    for candidate in (
        directory.joinpath(*parts).with_suffix(".py"),
        directory.joinpath(*parts, "__init__.py"),
    ):
        if candidate.is_file():
            return candidate
    return None


def _top_level_names(tree: ast.Module) -> list[str]:
    names = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names += [alias.asname or alias.name.split(".")[0] for alias in node.names]
    return names


def _entrypoint_problems(manifest_path: Path, directory: Path, entrypoint: str) -> list[Problem]:
    module, _, attribute = entrypoint.partition(":")
    source = _module_file(directory, module)
    if source is None:
        return [
            Problem(
                manifest_path,
                f"field 'entrypoint': module {module!r} not found in {directory} "
                f"(expected {module.replace('.', '/')}.py there); set entrypoint to "
                "'<module file name without .py>:<class name>'",
            )
        ]
    try:
        tree = ast.parse(source.read_bytes(), filename=str(source))
    except SyntaxError as exc:
        return [Problem(source, f"syntax error: {exc.msg}", exc.lineno)]
    names = _top_level_names(tree)
    if attribute in names:
        return []
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    hint = f"; it defines {', '.join(classes)}" if classes else "; it defines no class"
    fix = f': set entrypoint = "{module}:{classes[0]}"' if len(classes) == 1 else ""
    return [
        Problem(
            manifest_path,
            f"field 'entrypoint': {source.name} has no top-level {attribute!r}{hint}{fix}",
        )
    ]


def _limit_problems(path: Path, manifest: Manifest, host: HostLimits) -> list[Problem]:
    problems = []
    timeout, memory = manifest.limits.timeout_s, manifest.limits.memory_mb
    if timeout is not None and timeout > host.max_timeout_s:
        problems.append(
            Problem(
                path,
                f"field 'limits.timeout_s': {timeout:g} s is over the host's maximum of "
                f"{host.max_timeout_s:g} s, and the host would cut it; "
                f"set timeout_s <= {host.max_timeout_s:g}",
            )
        )
    if memory is not None and memory > host.max_memory_mb:
        problems.append(
            Problem(
                path,
                f"field 'limits.memory_mb': {memory} MB is over the host's maximum of "
                f"{host.max_memory_mb} MB, and the host would cut it; "
                f"set memory_mb <= {host.max_memory_mb}",
            )
        )
    return problems


def static_problems(
    directory: Path, host: HostLimits | None = None
) -> tuple[Manifest | None, list[Problem]]:
    """The manifest (when valid) and every problem found without running code."""
    path = directory / MANIFEST
    data, problems = _read_manifest(path)
    if data is None:
        return None, problems
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        problems = [Problem(path, text) for text in describe_errors(exc)]
        entrypoint = data.get("entrypoint")
        if isinstance(entrypoint, str) and ":" in entrypoint:
            problems += _entrypoint_problems(path, directory, entrypoint)
        return None, problems
    problems += _entrypoint_problems(path, directory, manifest.entrypoint)
    problems += _limit_problems(path, manifest, host or HostLimits())
    return (manifest if not problems else None), problems
