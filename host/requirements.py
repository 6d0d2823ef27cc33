"""What a plugin declares it imports, read and checked by the host itself.

A plugin declares its packages as PEP 508 strings (`dependencies` in its
`plugin.toml`, or `[project].dependencies` of a `pyproject.toml` beside it),
or pins them in a `requirements.lock` beside the manifest. The installer
never reads a file of the plugin's: the host reads the lock, accepts only
what it can check, and hands the installer a lock of its own.

    requirements.lock --open(O_NOFOLLOW), regular file, <= MAX_LOCK_BYTES-->
        text --logical lines (comments, blanks, backslash continuations)-->
        `name==version --hash=sha256:<hex>...` each, markers evaluated here
        --> LockedPackage... --> normalised lock (one line a package)

Anything else in a lock (an installer option such as `--no-binary` or
`--find-links`, an include `-r`, a constraint `-c`, an editable `-e`, a URL
or a path, a version range, a line without a hash) is a `RequirementsError`
naming the file, the line and what was wrong. A dependency string must be a
package name with extras, a version specifier and markers: no URL
(`pkg @ https://...`) and nothing that looks like an option.

Errors:

    ValueError
     └── RequirementsError   (path, line, problem)
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import InvalidMarker, Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

LOCK_FILE = "requirements.lock"
PYPROJECT = "pyproject.toml"
# A lock of a few hundred packages with a dozen hashes each is under 100 KiB.
MAX_LOCK_BYTES = 256 * 1024
MAX_PYPROJECT_BYTES = 256 * 1024
MAX_DEPENDENCIES = 500

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_EXTRAS = rf"(?:\[\s*{_NAME}(?:\s*,\s*{_NAME})*\s*\])?"
_PINNED = re.compile(rf"^(?P<name>{_NAME})(?P<extras>{_EXTRAS})==(?P<version>[A-Za-z0-9.+!_-]+)$")
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
# Text that would end or split a line for an installer but not for an
# editor (pip reads a requirements file with str.splitlines), and controls.
_BAD_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x85\u2028\u2029]")
_COMMENT = re.compile(r"(^|\s)#.*$")


class RequirementsError(ValueError):
    """A declaration the host refuses. `line` is 1-based (0: the whole file)."""

    def __init__(self, path: str | Path, line: int, problem: str) -> None:
        where = f"{path}, line {line}" if line else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = Path(path)
        self.line = line
        self.problem = problem


@dataclass(frozen=True)
class LockedPackage:
    """One accepted line of a lock: a pinned package and its hashes."""

    name: str  # canonical (PEP 503)
    version: str
    hashes: tuple[str, ...]  # "sha256:<hex>", as the lock gave them

    def line(self) -> str:
        return " ".join([f"{self.name}=={self.version}", *(f"--hash={h}" for h in self.hashes)])


@dataclass(frozen=True)
class Requirements:
    """What one plugin declares: PEP 508 strings, or a hash-pinned lock.

    `lock` is the normalised lock the host wrote from the plugin's (only
    accepted lines), never the plugin's own text."""

    dependencies: tuple[str, ...] = ()
    lock: str | None = None
    source: str = ""  # the file it came from, for messages

    @property
    def empty(self) -> bool:
        return not self.dependencies and self.lock is None


def _shown(text: str, limit: int = 80) -> str:
    """A piece of the plugin's text for a message: quoted, bounded."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _logical_lines(text: str, path: str | Path) -> Iterable[tuple[int, str]]:
    """(first line number, text) of each non-empty logical line, comments
    removed and backslash continuations joined."""
    pending: list[str] = []
    first = 0
    lines = text.split("\n")
    for number, raw in enumerate(lines, 1):
        line = raw.removesuffix("\r")
        if _BAD_CHARACTERS.search(line):
            raise RequirementsError(path, number, "control characters are not allowed")
        if not pending:
            first = number
        line = _COMMENT.sub("", line)
        if line.endswith("\\"):
            pending.append(line[:-1])
            if number == len(lines):
                raise RequirementsError(path, first, "the file ends inside a continued line")
            continue
        pending.append(line)
        joined = " ".join(pending).strip()
        pending = []
        if joined:
            yield first, joined


def _refusal(token: str) -> str:
    """Why `token`, where a `name==version` should be, is refused."""
    if token.startswith("-"):
        option = token.split("=", 1)[0]
        if not option.startswith("--"):
            option = option[:2]  # `-r/etc/shadow` is `-r /etc/shadow`
        kinds = {
            "-r": "an include of another file",
            "--requirement": "an include of another file",
            "-c": "a constraints file",
            "--constraint": "a constraints file",
            "-e": "an editable install",
            "--editable": "an editable install",
        }
        kind = kinds.get(option, "an installer option")
        return f"{kind} ({_shown(option, 40)}) is not allowed in a lock"
    if "://" in token or "@" in token or token.startswith((".", "/", "~")) or "/" in token:
        return f"{_shown(token)}: URLs and paths are not allowed; pin `name==version`"
    return f"{_shown(token)} is not `name==version` (a lock pins one exact version)"


def _package(number: int, line: str, path: str | Path) -> LockedPackage | None:
    """The package of one logical line; None when its marker excludes this
    interpreter. Raises RequirementsError."""
    if line.startswith("-"):
        raise RequirementsError(path, number, _refusal(line.split()[0]))
    if "://" in line or re.search(r"(^|\s)@(\s|$)", line):
        raise RequirementsError(
            path, number, "URLs and direct references are not allowed; pin `name==version`"
        )
    requirement, _, marker_text = line.partition(";")
    options = ""
    if marker_text:
        # The marker runs up to the first option; markers hold no "--".
        marker_text, dashes, options = marker_text.partition(" --")
        options = dashes + options
        try:
            marker: Marker | None = Marker(marker_text.strip())
        except InvalidMarker:
            raise RequirementsError(
                path, number, f"{_shown(marker_text.strip())} is not an environment marker"
            ) from None
        tokens = requirement.split()
    else:
        marker = None
        tokens = requirement.split()
        tokens, options = tokens[:1], " ".join(tokens[1:])
    if len(tokens) != 1:
        raise RequirementsError(path, number, _refusal(tokens[1] if tokens else ""))
    pinned = _PINNED.match(tokens[0])
    if pinned is None:
        raise RequirementsError(path, number, _refusal(tokens[0]))
    try:
        Version(pinned["version"])
    except InvalidVersion:
        raise RequirementsError(
            path, number, f"{_shown(pinned['version'])} is not a version"
        ) from None
    hashes = _hashes(number, options.split(), path)
    try:
        if marker is not None and not marker.evaluate():
            return None
    except ValueError as exc:  # a marker this interpreter cannot answer
        raise RequirementsError(path, number, f"environment marker: {exc}") from None
    return LockedPackage(canonicalize_name(pinned["name"]), pinned["version"], hashes)


def _hashes(number: int, tokens: list[str], path: str | Path) -> tuple[str, ...]:
    """The `--hash=sha256:<hex>` options of one line (`--hash sha256:...` too)."""
    hashes: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token == "--hash" and index + 1 < len(tokens):
            value = tokens[index + 1]
            index += 2
        elif token.startswith("--hash="):
            value = token.removeprefix("--hash=")
            index += 1
        else:
            raise RequirementsError(path, number, _refusal(token))
        if not _HASH.match(value):
            raise RequirementsError(
                path, number, f"{_shown(value)}: a hash is `sha256:` and 64 hex digits"
            )
        hashes.append(value)
    if not hashes:
        raise RequirementsError(path, number, "no --hash=sha256:...: every package needs one")
    return tuple(hashes)


def parse_lock(text: str, path: str | Path) -> tuple[LockedPackage, ...]:
    """The packages a lock pins, for this interpreter. Raises RequirementsError
    for the first line the host does not accept."""
    packages: dict[str, tuple[int, LockedPackage]] = {}
    for number, line in _logical_lines(text, path):
        package = _package(number, line, path)
        if package is None:
            continue
        if package.name in packages:
            earlier = packages[package.name][0]
            raise RequirementsError(
                path, number, f"{package.name} is pinned twice (first on line {earlier})"
            )
        packages[package.name] = (number, package)
    return tuple(package for _, package in packages.values())


def normalise_lock(text: str, path: str | Path) -> str:
    """The lock the installer is given: the accepted packages, one line
    each, nothing else. Raises RequirementsError."""
    return "".join(package.line() + "\n" for package in parse_lock(text, path))


def _read_plugin_file(path: Path, limit: int) -> bytes | None:
    """The bytes of a file in a plugin's directory; None when there is none.

    Never through a symbolic link, only a regular file, at most `limit`
    bytes. Raises RequirementsError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            raise RequirementsError(path, 0, "is a symbolic link; it must be a file") from None
        raise RequirementsError(path, 0, f"cannot be read: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RequirementsError(path, 0, "is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as stream:
            data = stream.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise RequirementsError(path, 0, f"is larger than {limit // 1024} KiB")
    return data


def read_lock(path: Path) -> str | None:
    """The normalised lock of `path`; None when there is none. Raises
    RequirementsError."""
    data = _read_plugin_file(path, MAX_LOCK_BYTES)
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RequirementsError(path, line, "is not UTF-8 text") from None
    return normalise_lock(text.removeprefix("\ufeff"), path)


def check_dependency(value: str) -> str:
    """`value` when it is a PEP 508 requirement the installer may be given:
    a name, extras, a version specifier and markers. Raises ValueError."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a dependency is a non-empty string")
    if value.lstrip().startswith("-"):
        raise ValueError(f"{_shown(value)} looks like an installer option")
    if _BAD_CHARACTERS.search(value) or "\n" in value or "\r" in value:
        raise ValueError(f"{_shown(value)} holds control characters")
    try:
        requirement = Requirement(value)
    except InvalidRequirement as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(f"{_shown(value)} is not a PEP 508 requirement: {first}") from None
    if requirement.url is not None:
        raise ValueError(
            f"{_shown(value)}: a direct reference (URL or path) is not allowed; "
            "name the package and a version specifier"
        )
    return value


def check_dependencies(values: Iterable[str], path: str | Path) -> tuple[str, ...]:
    """Every value through `check_dependency`. Raises RequirementsError."""
    checked = []
    for index, value in enumerate(values):
        if index >= MAX_DEPENDENCIES:
            raise RequirementsError(path, 0, f"more than {MAX_DEPENDENCIES} dependencies")
        try:
            checked.append(check_dependency(value))
        except ValueError as exc:
            raise RequirementsError(path, 0, f"dependencies[{index}]: {exc}") from None
    return tuple(checked)


def read_requirements(
    directory: Path, declared: Iterable[str] = (), manifest: str = "plugin.toml"
) -> Requirements:
    """A plugin's requirements: its lock if it has one, else the manifest's
    `dependencies`, else `[project].dependencies` of its `pyproject.toml`.
    Raises RequirementsError naming the file (and line) that is refused."""
    lock = read_lock(directory / LOCK_FILE)
    declared = check_dependencies(declared, directory / manifest)
    if lock is not None:
        return Requirements(declared, lock, str(directory / LOCK_FILE))
    if declared:
        return Requirements(declared, None, str(directory / manifest))
    pyproject = directory / PYPROJECT
    data = _read_plugin_file(pyproject, MAX_PYPROJECT_BYTES)
    if data is None:
        return Requirements()
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RequirementsError(pyproject, 0, f"is not valid TOML: {exc}") from None
    project = parsed.get("project", {})
    found = project.get("dependencies", []) if isinstance(project, dict) else []
    if not isinstance(found, list) or not all(isinstance(d, str) for d in found):
        raise RequirementsError(pyproject, 0, "[project].dependencies must be strings")
    return Requirements(check_dependencies(found, pyproject), None, str(pyproject))


__all__ = [
    "LOCK_FILE",
    "MAX_LOCK_BYTES",
    "LockedPackage",
    "Requirements",
    "RequirementsError",
    "check_dependencies",
    "check_dependency",
    "normalise_lock",
    "parse_lock",
    "read_lock",
    "read_requirements",
]
