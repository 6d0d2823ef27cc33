"""Plugin environments: the packages a plugin declares, installed apart from the host's.

A plugin declares what it imports as PEP 508 strings (`dependencies` in its
`plugin.toml`, or `[project].dependencies` of a `pyproject.toml` beside it),
or pins it in a `requirements.lock` beside the manifest (`name==version` lines
with `--hash=sha256:...`, as `uv pip compile --generate-hashes` writes them).
Preparing installs that set, with uv (pip where uv is absent), into a
directory of its own under `<state_dir>/envs/`, outside any call:

    declared set + interpreter --install--> resolved set --sha256--> envs/<key>/
    envs/by-spec/<declared hash>.json  ->  {"key": ..., "packages": [...]}

Two plugins whose declarations resolve to the same packages share one
directory; two that need different versions of a package get one each. Only
wheels are installed unless the operator allows source builds for a plugin
(a source build runs the package's own build code, as the host's user). A
lock is installed with `--require-hashes`. An environment is built in a
temporary directory and renamed into place, so a directory under `envs/` is
always complete. `collect` removes the directories no plugin refers to.

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
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

LOCK_FILE = "requirements.lock"
PYPROJECT = "pyproject.toml"
BY_SPEC = "by-spec"
MARKER = ".plughost-env.json"
# Written once every module of an environment has its bytecode: a call's
# child cannot write it (the environment is read-only there), so without it
# every call would compile every module it imports, again.
COMPILED = ".plughost-compiled"
CACHE = ".cache"  # the installers' download cache, kept between preparations
INSTALL_TIMEOUT_S = 900.0
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


@dataclass(frozen=True)
class Requirements:
    """What one plugin declares: PEP 508 strings, or a hash-pinned lock."""

    dependencies: tuple[str, ...] = ()
    lock: str | None = None  # the lock file's text
    source: str = ""  # the file it came from, for messages

    @property
    def empty(self) -> bool:
        return not self.dependencies and self.lock is None


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


def read_requirements(
    directory: Path, declared: Iterable[str] = (), manifest: str = "plugin.toml"
) -> Requirements:
    """A plugin's requirements: its lock if it has one, else the manifest's
    `dependencies`, else `[project].dependencies` of its `pyproject.toml`."""
    lock = directory / LOCK_FILE
    if lock.is_file():
        return Requirements(tuple(declared), lock.read_text(encoding="utf-8"), str(lock))
    if declared:
        return Requirements(tuple(declared), None, str(directory / manifest))
    pyproject = directory / PYPROJECT
    if pyproject.is_file():
        with pyproject.open("rb") as stream:
            data = tomllib.load(stream)
        found = data.get("project", {}).get("dependencies", [])
        if not isinstance(found, list) or not all(isinstance(d, str) for d in found):
            raise PrepareError(f"{pyproject}: [project].dependencies must be strings")
        return Requirements(tuple(found), None, str(pyproject))
    return Requirements()


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


def find_uv() -> str | None:
    """The uv executable: beside this interpreter (a venv's bin), then PATH."""
    beside = Path(sys.executable).parent / "uv"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("uv")


def install_command(
    target: Path, requirements: Requirements, allow_sdist: bool, lock_path: Path | None
) -> list[str]:
    """The uv (or pip) command that installs `requirements` into `target`."""
    uv = find_uv()
    if uv is not None:
        command = [uv, "pip", "install", "--no-config", "--python", sys.executable]
        command += ["--target", str(target), "--no-progress"]
        command += [] if allow_sdist else ["--only-binary", ":all:"]
    else:
        command = [sys.executable, "-m", "pip", "install", "--no-input", "--target", str(target)]
        command += ["--disable-pip-version-check", "--no-warn-script-location"]
        command += [] if allow_sdist else ["--only-binary=:all:"]
    if lock_path is not None:
        return [*command, "--require-hashes", "--no-deps", "-r", str(lock_path)]
    return [*command, "--", *requirements.dependencies]


def _run_installer(command: list[str], progress: Progress, deadline_s: float, cache: Path) -> None:
    """Run the installer, forwarding its output line by line; raise on failure.

    Its download cache is `cache` (unless the operator's environment names
    one): a service account may have no home to keep one in. uv trusts the
    machine's certificate store, as pip does, so a package index behind the
    operator's own TLS proxy or mirror works without extra configuration."""
    env = dict(os.environ)
    env.setdefault("UV_SYSTEM_CERTS", "1")
    env.setdefault("UV_CACHE_DIR", str(cache / "uv"))
    env.setdefault("PIP_CACHE_DIR", str(cache / "pip"))
    with subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as process:
        timer = threading.Timer(deadline_s, process.kill)
        timer.start()
        tail: list[str] = []
        try:
            assert process.stdout is not None
            for line in process.stdout:
                line = line.rstrip()
                if line:
                    progress(line)
                    tail = (tail + [line])[-20:]
            status = process.wait()
        finally:
            timer.cancel()
    if status != 0:
        raise PrepareError(f"the installer exited with status {status}: " + " | ".join(tail[-5:]))


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


@dataclass
class EnvState:
    status: EnvStatus
    path: Path | None = None
    message: str = ""
    packages: list[str] = field(default_factory=list)

    def public(self) -> dict[str, object]:
        shown: dict[str, object] = {"status": self.status.value, "packages": self.packages}
        if self.message:
            shown["message"] = self.message
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
            with self._file_lock(key):
                current = self.state(plugin, requirements)
                if current.status is EnvStatus.READY and not refresh:
                    self.touch(plugin, requirements)
                    if current.path is not None:
                        _compile(current.path)  # prepared before environments were compiled
                    return current
                return self._build(plugin, key, requirements, progress)
        except (PrepareError, OSError) as exc:
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

    def _build(
        self, plugin: str, key: str, requirements: Requirements, progress: Progress
    ) -> EnvState:
        started = time.monotonic()
        progress(f"{plugin}: preparing its environment ({requirements.source})")
        workdir = Path(tempfile.mkdtemp(prefix=".building-", dir=self.root))
        try:
            target = workdir / "site"
            lock_path = None
            if requirements.lock is not None:
                lock_path = workdir / LOCK_FILE
                lock_path.write_text(requirements.lock, encoding="utf-8")
            command = install_command(target, requirements, self.sdist_allowed(plugin), lock_path)
            _run_installer(
                command,
                lambda line: progress(f"{plugin}: {line}"),
                INSTALL_TIMEOUT_S,
                self.root / CACHE,
            )
            target.mkdir(exist_ok=True)
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
        directory), then every environment no remaining record names."""
        keep_keys = set(in_use)
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
                if entry.name in (BY_SPEC, CACHE) or entry.name in kept_dirs:
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
        record = self.root / BY_SPEC / f"{self.key_for(plugin, requirements)}.json"
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
    """An exclusive flock: one preparation per declaration across processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def __enter__(self) -> _FileLock:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + INSTALL_TIMEOUT_S + 60
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self._fd)
                    raise PrepareError(f"{self.path} is held by another preparation") from None
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)
