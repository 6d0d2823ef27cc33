"""Plugin environments: the packages a plugin declares, installed apart from the host's.

A plugin declares what it imports as PEP 508 strings (`dependencies` in its
`plugin.toml`, or `[project].dependencies` of a `pyproject.toml` beside it),
or pins it in a `requirements.lock` beside the manifest (`name==version` lines
with `--hash=sha256:...`, as `uv pip compile --generate-hashes` writes them);
`host.requirements` reads and checks both. Preparing installs that set with
uv (pip where uv is absent), confined (`host.installer`), into a directory of
its own under `<state_dir>/envs/`, outside any call:

    declared set + interpreter --install--> resolved set --sha256--> envs/<key>/
    envs/by-spec/<declared hash>.json  ->  {"key": ..., "packages": [...]}

Two plugins whose declarations resolve to the same packages share one
directory; two that need different versions of a package get one each. Only
wheels are installed unless the operator allows source builds for a plugin
(a source build runs the package's own build code, confined as the
installer is). A lock is installed with `--require-hashes --no-deps`. An
environment is the host's own copy of what the installer wrote, made in a
temporary directory and renamed into place, so a directory under `envs/` is
always complete. `collect` removes the directories no plugin refers to.

What a client is shown of an environment is its status and a fixed message
(`EnvState.public`); the installer's words and the host's paths
(`EnvState.detail`) are the admin's.

In the child, a plugin's import path is its own directory, its environment
and the standard library; nothing of the host's site-packages.
"""

from __future__ import annotations

import compileall
import contextlib
import enum
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from host.installer import InstallError, copy_tree, install
from host.installer import find_uv as find_uv
from host.installer import install_command as install_command
from host.requirements import LOCK_FILE as LOCK_FILE
from host.requirements import Requirements as Requirements
from host.requirements import RequirementsError
from host.requirements import read_requirements as read_requirements

BY_SPEC = "by-spec"
MARKER = ".plughost-env.json"
# Written once every module of an environment has its bytecode: a call's
# child cannot write it (the environment is read-only there), so without it
# every call would compile every module it imports, again.
COMPILED = ".plughost-compiled"
# The installer's download cache, kept between preparations and owned by the
# installer's uid on a root host. `.cache` was the one of versions whose
# installer ran as the host's user: left alone, never shared with this one.
CACHE = ".installer-cache"
LEGACY_CACHE = ".cache"
INSTALL_TIMEOUT_S = 900.0
# A host that reads a ready environment (every call does) marks its declaration
# in use when the mark is older than this, so that `collect` on another host
# sharing the directory (grace: an hour) never takes an environment in use.
TOUCH_EVERY_S = 600.0
# Held shared by every preparation, taken exclusively by `collect`, which gives
# way (collects nothing) while any preparation on any host is under way.
COLLECT_LOCK = ".collect.lock"
_DIST_INFO = re.compile(r"^(?P<name>.+?)-(?P<version>[^-]+)\.dist-info$")

Progress = Callable[[str], None]


class PrepareError(Exception):
    """An environment that could not be prepared; the message says why."""


class EnvStatus(enum.StrEnum):
    NONE = "none"  # the plugin declares no packages
    READY = "ready"
    MISSING = "missing"  # declared, not prepared yet
    PREPARING = "preparing"
    FAILED = "failed"


def interpreter_identity() -> str:
    """What an environment is only valid for: this Python, on this machine."""
    return "|".join(
        (
            sys.implementation.cache_tag or sys.implementation.name,
            sys.version.split()[0],
            platform.machine(),
            os.path.realpath(sys.base_prefix),
        )
    )


def declared_key(requirements: Requirements, allow_sdist: bool) -> str:
    """The hash of a declaration, on this interpreter, under this policy."""
    text = json.dumps(
        {
            "python": interpreter_identity(),
            "dependencies": sorted(d.strip() for d in requirements.dependencies),
            "lock": requirements.lock,
            "sdist": allow_sdist,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def installed_packages(target: Path) -> list[str]:
    """`name==version` of every distribution installed in `target`, sorted."""
    found = []
    for entry in target.iterdir():
        match = _DIST_INFO.match(entry.name)
        if match and entry.is_dir():
            name = re.sub(r"[-_.]+", "-", match["name"]).lower()
            found.append(f"{name}=={match['version']}")
    return sorted(found)


def resolved_key(packages: list[str]) -> str:
    """The directory name of an environment: its resolved set on this interpreter."""
    text = json.dumps({"python": interpreter_identity(), "packages": packages})
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _compile(root: Path) -> None:
    """Write the bytecode of every module under `root` (once: COMPILED
    marks it done), readable by every call uid. A module that does not
    compile is left as it is: importing it fails the same way without."""
    if (root / COMPILED).is_file():
        return
    compileall.compile_dir(str(root), quiet=2, workers=1)
    _make_readable(root)
    (root / COMPILED).write_text("")


def _make_readable(root: Path) -> None:
    """Every call uid reads the environment; nobody but its owner writes it."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        extra = 0o755 if path.is_dir() or mode & 0o111 else 0o644
        path.chmod((mode & 0o755) | extra)


@dataclass(frozen=True)
class _Record:
    key: str
    packages: list[str]


# What anyone may be told of an environment that cannot be used, by status:
# a reason code and a fixed message, never the installer's words or a path.
PUBLIC_REASONS: dict[EnvStatus, tuple[str, str]] = {
    EnvStatus.MISSING: (
        "environment_missing",
        "its packages are not installed yet (`plughost plugins prepare` installs them)",
    ),
    EnvStatus.PREPARING: ("environment_preparing", "its packages are being installed"),
    EnvStatus.FAILED: (
        "environment_failed",
        "its packages could not be installed; the operator has the details",
    ),
}


@dataclass
class EnvState:
    """Where an environment stands. `message` is the operator's text (the
    installer's output, the files and paths involved): `public` shows it
    only to the admin, as `detail`."""

    status: EnvStatus
    path: Path | None = None
    message: str = ""
    packages: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str | None:
        found = PUBLIC_REASONS.get(self.status)
        return found[0] if found else None

    def public(self, admin: bool = False) -> dict[str, object]:
        """What a client sees: status, packages, a reason code and a fixed
        message; the admin also gets `detail`, the full text."""
        shown: dict[str, object] = {"status": self.status.value, "packages": self.packages}
        found = PUBLIC_REASONS.get(self.status)
        if found is not None:
            shown["reason"], shown["message"] = found
        if admin and self.message:
            shown["detail"] = self.message
        return shown


class EnvironmentStore:
    """The environments of one host, under `root` (`<state_dir>/envs`)."""

    def __init__(self, root: str | Path, allow_sdist: Iterable[str] = ()) -> None:
        self.root = Path(root)
        self.allow_sdist = set(allow_sdist)
        self._lock = threading.Lock()
        self._preparing: dict[str, str] = {}  # declared key -> plugin name
        self._failed: dict[str, str] = {}  # declared key -> message

    def sdist_allowed(self, plugin: str) -> bool:
        return "*" in self.allow_sdist or plugin in self.allow_sdist

    def key_for(self, plugin: str, requirements: Requirements) -> str:
        return declared_key(requirements, self.sdist_allowed(plugin))

    def state(self, plugin: str, requirements: Requirements) -> EnvState:
        """Ready (with its directory), missing, preparing or failed; never blocks."""
        if requirements.empty:
            return EnvState(EnvStatus.NONE)
        key = self.key_for(plugin, requirements)
        record = self._record(key)
        if record is not None:
            path = self.root / record.key
            if (path / MARKER).is_file():
                marked = self.root / BY_SPEC / f"{key}.json"
                if _age_s(marked) > TOUCH_EVERY_S:
                    _touch(marked)
                return EnvState(EnvStatus.READY, path, packages=record.packages)
        with self._lock:
            if key in self._preparing:
                return EnvState(EnvStatus.PREPARING, message="being prepared")
            if key in self._failed:
                return EnvState(EnvStatus.FAILED, message=self._failed[key])
        return EnvState(
            EnvStatus.MISSING,
            message=f"not prepared: run `plughost plugins prepare` ({requirements.source})",
        )

    def _record(self, key: str) -> _Record | None:
        """Which environment a declaration resolved to, if it was prepared."""
        try:
            data = json.loads((self.root / BY_SPEC / f"{key}.json").read_text())
            return _Record(str(data["key"]), [str(p) for p in data["packages"]])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def prepare(
        self,
        plugin: str,
        requirements: Requirements,
        progress: Progress = lambda _line: None,
        refresh: bool = False,
    ) -> EnvState:
        """Install `requirements` unless an environment for them is ready.

        Returns the state reached (READY or FAILED); raises nothing for an
        installer failure, which is kept and reported by `state`.
        """
        if requirements.empty:
            return EnvState(EnvStatus.NONE)
        key = self.key_for(plugin, requirements)
        with self._lock:
            self._preparing[key] = plugin
            self._failed.pop(key, None)
        try:
            with self._collect_lock(fcntl.LOCK_SH), self._file_lock(key):
                current = self.state(plugin, requirements)
                if current.status is EnvStatus.READY and not refresh:
                    self.touch(plugin, requirements)
                    if current.path is not None:
                        _compile(current.path)  # prepared before environments were compiled
                    return current
                return self._build(plugin, key, requirements, progress)
        except (PrepareError, InstallError, RequirementsError, OSError) as exc:
            message = f"{requirements.source}: environment not prepared: {exc}"
            with self._lock:
                self._failed[key] = message
            return EnvState(EnvStatus.FAILED, message=message)
        finally:
            with self._lock:
                self._preparing.pop(key, None)

    def _file_lock(self, key: str) -> _FileLock:
        (self.root / BY_SPEC).mkdir(parents=True, exist_ok=True)
        return _FileLock(self.root / BY_SPEC / f"{key}.lock")

    def _collect_lock(self, mode: int, wait: bool = True) -> _FileLock:
        (self.root / BY_SPEC).mkdir(parents=True, exist_ok=True)
        return _FileLock(self.root / BY_SPEC / COLLECT_LOCK, mode, wait)

    def _build(
        self, plugin: str, key: str, requirements: Requirements, progress: Progress
    ) -> EnvState:
        started = time.monotonic()
        progress(f"{plugin}: preparing its environment ({requirements.source})")
        workdir = Path(tempfile.mkdtemp(prefix=".building-", dir=self.root))
        try:
            site = install(
                workdir,
                self.root / CACHE,
                requirements.dependencies if requirements.lock is None else (),
                requirements.lock,
                self.sdist_allowed(plugin),
                lambda line: progress(f"{plugin}: {line}"),
                INSTALL_TIMEOUT_S,
            )
            target = workdir / "env"
            copy_tree(site, target)  # the host's own files, not the installer's
            packages = installed_packages(target)
            final = self.root / resolved_key(packages)
            self._place(target, final, packages)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        record = {"key": final.name, "packages": packages, "plugin": plugin}
        _write_atomic(self.root / BY_SPEC / f"{key}.json", json.dumps(record))
        elapsed = time.monotonic() - started
        progress(f"{plugin}: environment ready, {len(packages)} packages in {elapsed:.1f} s")
        return EnvState(EnvStatus.READY, final, packages=packages)

    def _place(self, target: Path, final: Path, packages: list[str]) -> None:
        """Move a finished build to `final`, unless an equal one is there already."""
        if (final / MARKER).is_file():
            return
        shutil.rmtree(final, ignore_errors=True)
        (target / MARKER).write_text(json.dumps({"packages": packages}))
        _compile(target)  # and made readable by every call uid
        target.rename(final)

    def collect(self, in_use: Iterable[str], grace_s: float = 3600.0) -> list[str]:
        """Remove what no plugin uses: the records of declarations not in
        `in_use` left untouched for `grace_s` (another host may share this
        directory: its calls keep marking what they use, `TOUCH_EVERY_S`),
        then every environment no remaining record names. Nothing while a
        preparation is under way, here or on another host (it may have just
        found one of them ready): the next collection does it."""
        if not self.root.is_dir():
            return []
        try:
            with self._collect_lock(fcntl.LOCK_EX, wait=False):
                return self._collect(set(in_use), grace_s)
        except OSError:  # a preparation holds it (or this user may not take it)
            return []

    def _collect(self, keep_keys: set[str], grace_s: float) -> list[str]:
        records = self.root / BY_SPEC
        kept_dirs: set[str] = set()
        if records.is_dir():
            for record in records.glob("*.json"):
                data = self._record(record.stem)
                if data is not None and (record.stem in keep_keys or _age_s(record) < grace_s):
                    kept_dirs.add(data.key)
                else:
                    record.unlink(missing_ok=True)
        removed = []
        if self.root.is_dir():
            for entry in sorted(self.root.iterdir()):
                if entry.name in (BY_SPEC, CACHE, LEGACY_CACHE) or entry.name in kept_dirs:
                    continue
                if not entry.is_dir():
                    continue
                if entry.name.startswith(".building-") and _age_s(entry) < INSTALL_TIMEOUT_S:
                    continue  # another preparation's work in progress
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    def touch(self, plugin: str, requirements: Requirements) -> None:
        """Mark a declaration as in use now (what `collect`'s grace counts from)."""
        _touch(self.root / BY_SPEC / f"{self.key_for(plugin, requirements)}.json")


def _touch(record: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(record)


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


class _FileLock:
    """A flock across processes: exclusive (one preparation per declaration),
    or `mode` LOCK_SH. Waits for it (at most an installation's time), or with
    `wait` False raises BlockingIOError at once when it is held."""

    def __init__(self, path: Path, mode: int = fcntl.LOCK_EX, wait: bool = True) -> None:
        self.path = path
        self.mode = mode
        self.wait = wait
        self._fd = -1

    def __enter__(self) -> _FileLock:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + INSTALL_TIMEOUT_S + 60
        while True:
            try:
                fcntl.flock(self._fd, self.mode | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if not self.wait:
                    os.close(self._fd)
                    raise
                if time.monotonic() > deadline:
                    os.close(self._fd)
                    raise PrepareError(f"{self.path} is held by another preparation") from None
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)
