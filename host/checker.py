"""`plughost check DIR`, the static half: every problem of a plugin directory
that can be found without running it, each naming the file and what to change.

Nothing here imports or executes the plugin's code: the module is parsed
(`ast`), never imported. The running half (prepare the environment, call the
plugin in the sandbox on sample images) builds on these results.

What it finds: a manifest that is missing, not TOML or not valid (every
field's problem, and every problem of the `[options]` JSON Schema, each with
its path); an entrypoint whose module or class is not there; limits over the
host's maxima; and a module-level import of the entrypoint's module that is
neither the standard library, the plugin's own file, nor a package its
`dependencies` (or lock, or pyproject.toml) declares.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from pydantic import ValidationError

from host.manifest import Manifest, describe_errors
from host.requirements import RequirementsError, parse_lock, read_requirements
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
    if not path.parent.is_dir():
        return None, [Problem(path.parent, "no such directory")]
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


def _parse_entrypoint(
    manifest_path: Path, directory: Path, entrypoint: str
) -> tuple[Path, ast.Module] | Problem:
    """The entrypoint's module file and its syntax tree, or what is wrong."""
    module = entrypoint.partition(":")[0]
    source = _module_file(directory, module)
    if source is None:
        return Problem(
            manifest_path,
            f"field 'entrypoint': module {module!r} not found in {directory} "
            f"(expected {module.replace('.', '/')}.py there); set entrypoint to "
            "'<module file name without .py>:<class name>'",
        )
    try:
        return source, ast.parse(source.read_bytes(), filename=str(source))
    except SyntaxError as exc:
        return Problem(source, f"syntax error: {exc.msg}", exc.lineno)


def _entrypoint_problems(manifest_path: Path, directory: Path, entrypoint: str) -> list[Problem]:
    module, _, attribute = entrypoint.partition(":")
    parsed = _parse_entrypoint(manifest_path, directory, entrypoint)
    if isinstance(parsed, Problem):
        return [parsed]
    source, tree = parsed
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
        problems = _manifest_problems(path, data, exc)
        entrypoint = data.get("entrypoint")
        if isinstance(entrypoint, str) and ":" in entrypoint:
            problems += _entrypoint_problems(path, directory, entrypoint)
        return None, problems
    problems += _entrypoint_problems(path, directory, manifest.entrypoint)
    problems += _limit_problems(path, manifest, host or HostLimits())
    if not problems:
        problems += _import_problems(path, directory, manifest)
    return (manifest if not problems else None), problems


def _manifest_problems(path: Path, data: dict[str, Any], exc: ValidationError) -> list[Problem]:
    """Every field's problem; for the options schema, every one of its own."""
    texts = describe_errors(exc)
    schema = data.get("options")
    found = list(schema_problems(schema)) if isinstance(schema, dict) else []
    if found:
        texts = [text for text in texts if not text.startswith("field 'options':")]
        texts += [f"field {where}: {problem}" for where, problem in found]
    return [Problem(path, text) for text in texts]


# -- the options schema --------------------------------------------------------

JSON_TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")


def schema_problems(schema: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Every way `schema` is not a valid JSON Schema (draft 2020-12), as
    (`options.properties.count.type`, what is wrong in plain words)."""
    meta = jsonschema.Draft202012Validator.META_SCHEMA
    checker = jsonschema.Draft202012Validator(meta)
    for error in sorted(checker.iter_errors(schema), key=lambda e: list(map(str, e.path))):
        where = ".".join(["options", *map(str, error.absolute_path)])
        yield f"'{where}'", _plain(error)


def _plain(error: jsonschema.ValidationError) -> str:
    keyword = error.absolute_path[-1] if error.absolute_path else None
    if keyword == "type" and error.validator in ("anyOf", "enum"):
        given = error.instance
        if isinstance(given, list):
            wrong = [t for t in given if t not in JSON_TYPES]
            given = wrong[0] if wrong else given
        return f"{given!r} is not one of the JSON Schema types ({', '.join(JSON_TYPES)})"
    if error.validator in ("anyOf", "oneOf") and error.context:
        return str(jsonschema.exceptions.best_match(error.context).message)
    return error.message


# -- what the module imports -----------------------------------------------------

# Distributions whose import name is not their own name, normalised (PEP 503).
IMPORT_NAMES = {
    "pillow": ("PIL",),
    "opencv-python": ("cv2",),
    "opencv-python-headless": ("cv2",),
    "opencv-contrib-python": ("cv2",),
    "opencv-contrib-python-headless": ("cv2",),
    "scikit-image": ("skimage",),
    "scikit-learn": ("sklearn",),
    "pyyaml": ("yaml",),
    "beautifulsoup4": ("bs4",),
    "python-dateutil": ("dateutil",),
    "pymupdf": ("fitz", "pymupdf"),
    "pycryptodome": ("Crypto",),
    "protobuf": ("google",),
    "attrs": ("attr", "attrs"),
    "python-magic": ("magic",),
    "onnxruntime-gpu": ("onnxruntime",),
    "imageio-ffmpeg": ("imageio_ffmpeg",),
}


def import_names(distribution: str) -> set[str]:
    """The top-level modules `distribution` provides, as far as this host can
    tell: the table above, what installed distributions say of themselves,
    and the name itself with dashes as underscores."""
    name = canonicalize_name(distribution)
    names = {name.replace("-", "_"), *IMPORT_NAMES.get(name, ())}
    for module, owners in _installed().items():
        if any(canonicalize_name(owner) == name for owner in owners):
            names.add(module)
    return {n.lower() for n in names}


def distribution_of(module: str) -> str:
    """The distribution to declare for `module` (its best guess)."""
    for distribution, modules in IMPORT_NAMES.items():
        if module in modules:
            return {"pillow": "Pillow", "onnxruntime-gpu": "onnxruntime"}.get(
                distribution, distribution
            )
    owners = _installed().get(module)
    return owners[0] if owners else module


def _installed() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def _declared(directory: Path, manifest: Manifest) -> set[str]:
    """The distributions the plugin declares, normalised."""
    try:
        requirements = read_requirements(directory, manifest.dependencies, MANIFEST)
    except RequirementsError:
        return set()  # reported when the environment is prepared
    if requirements.lock is not None:
        return {p.name for p in parse_lock(requirements.lock, requirements.source)}
    names: set[str] = set()
    for text in requirements.dependencies:
        try:
            names.add(canonicalize_name(Requirement(text).name))
        except InvalidRequirement:
            continue  # the manifest's validation reports it
    return names


def _module_imports(tree: ast.Module) -> Iterator[tuple[str, int]]:
    """The top-level modules the module imports when it is loaded."""
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


def _import_problems(path: Path, directory: Path, manifest: Manifest) -> list[Problem]:
    parsed = _parse_entrypoint(path, directory, manifest.entrypoint)
    if isinstance(parsed, Problem):
        return [parsed]
    source, tree = parsed
    provided: set[str] = set()
    for distribution in _declared(directory, manifest):
        provided |= import_names(distribution)
    problems = []
    for module, line in _module_imports(tree):
        own = (directory / f"{module}.py").is_file() or (directory / module).is_dir()
        if own or module in sys.stdlib_module_names or module.lower() in provided:
            continue
        wanted = distribution_of(module)
        problems.append(
            Problem(
                source,
                f"imports {module}, which `dependencies` does not declare (a call imports "
                "only the standard library, the plugin's own files and its declared "
                f'packages): add "{wanted}" to `dependencies` in {MANIFEST}',
                line,
            )
        )
    return problems
