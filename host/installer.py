"""The package installer: the command it is given, and how it is confined.

    EnvironmentStore._build (host.environments)
      install(workdir, cache, ...)
        workdir/requirements.lock   the host's normalised lock, never the plugin's
        install_command(...)        uv (pip where uv is missing), flags no file overrides
        installer_environment(...)  only what the index needs: PATH, locale,
                                    proxies, certificates, index settings
        run_confined(...)           python -m sandbox.confined:
          root host:   uid INSTALLER_UID, own mount and PID namespaces (the
                       work directory and the cache bound under /tmp), Landlock
          other hosts: the host's uid, Landlock
      -> workdir/site               what the installer wrote, which the host copies
      copy_tree(site, env)          regular files, directories and links inside
                                    the tree only, owned by the host's user

The installer's options come from the host alone: wheels only unless the
operator allowed source builds for the plugin, and for a lock
`--require-hashes --no-deps`. A lock (`host.requirements`) holds nothing
but pinned, hashed packages, and dependency strings are passed after `--`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from host.indexproxy import IndexProxy, index_hosts, upstream_of
from host.requirements import LOCK_FILE, check_dependencies, normalise_lock
from sandbox.confined import CONFINEMENT_FAILED, PROXY_PORT, Confinement
from sandbox.supervisor import uid_range

Progress = Callable[[str], None]

# The installer's own uid (and gid) on a root host: no user of the machine
# may own it, and it lies outside the per-call uids (sandbox.supervisor,
# PLUGHOST_UID_BASE), so no call can touch what it writes, nor it a call.
INSTALLER_UID = 1_499_999
# Where a root host's installer sees its directories (in its own mount
# namespace, whatever the host's paths are and whoever may enter them).
WORK_AT = "/tmp/plughost-install/work"
CACHE_AT = "/tmp/plughost-install/cache"
SITE, HOME, TMP = "site", "home", "tmp"

# What an index needs of the host's environment; everything else (tokens,
# database URLs, the host's own settings) stays with the host.
# The host's own proxy settings: the index proxy uses them; a confined
# installer gets the index proxy's instead.
PROXY_VARIABLES = frozenset(f"{name}_PROXY" for name in ("HTTP", "HTTPS", "ALL", "NO"))
PASSED_ON = frozenset(
    {
        "PATH",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        *(f"{name}_PROXY" for name in ("HTTP", "HTTPS", "ALL", "NO")),
        *(f"{name}_proxy" for name in ("http", "https", "all", "no")),
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "PIP_CERT",
        "PIP_CLIENT_CERT",
        "PIP_INDEX_URL",
        "PIP_EXTRA_INDEX_URL",
        "PIP_FIND_LINKS",
        "PIP_NO_INDEX",
        "PIP_TRUSTED_HOST",
        "PIP_DEFAULT_TIMEOUT",
        "PIP_RETRIES",
        "PIP_CONFIG_FILE",
        "UV_INDEX",
        "UV_INDEX_URL",
        "UV_DEFAULT_INDEX",
        "UV_EXTRA_INDEX_URL",
        "UV_FIND_LINKS",
        "UV_NO_INDEX",
        "UV_INDEX_STRATEGY",
        "UV_INSECURE_HOST",
        "UV_NATIVE_TLS",
        "UV_SYSTEM_CERTS",
        "UV_HTTP_TIMEOUT",
        "UV_OFFLINE",
    }
)
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


class InstallError(Exception):
    """The installer failed or could not be confined; the message says why
    (it quotes the installer: for the operator's eyes only)."""


def find_uv() -> str | None:
    """The uv executable: beside this interpreter (a venv's bin), then PATH."""
    beside = Path(sys.executable).parent / "uv"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("uv")


def confined_as_own_uid() -> bool:
    """Whether the installer gets a uid and namespaces of its own (a root host)."""
    return os.geteuid() == 0


def install_command(
    target: str,
    dependencies: Iterable[str],
    allow_sdist: bool,
    lock_path: str | None,
    uv: str | None = None,
) -> list[str]:
    """The uv (or pip, `uv` None and none found) command that installs
    into `target`: the lock at `lock_path`, else `dependencies` (checked
    again here: nothing option-like reaches the command line)."""
    uv = uv or find_uv()
    if uv is not None:
        command = [uv, "pip", "install", "--no-config", "--python", sys.executable]
        command += ["--target", target, "--no-progress", "--link-mode", "copy"]
        command += [] if allow_sdist else ["--no-build"]  # uv: --only-binary :all:, and more
    else:
        command = [sys.executable, "-m", "pip", "install", "--no-input", "--target", target]
        command += ["--disable-pip-version-check", "--no-warn-script-location"]
        command += [] if allow_sdist else ["--only-binary=:all:"]
    if lock_path is not None:
        return [*command, "--require-hashes", "--no-deps", "-r", lock_path]
    return [*command, "--", *check_dependencies(dependencies, "dependencies")]


def installer_environment(home: str, tmp: str, cache: str) -> dict[str, str]:
    """The installer's whole environment: PASSED_ON from the host's, and its
    own home, temporary directory and caches."""
    env = {name: value for name, value in os.environ.items() if name in PASSED_ON}
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    # uv trusts the machine's certificate store, as pip does, so an index
    # behind the operator's own TLS proxy or mirror works as it is.
    env.setdefault("UV_SYSTEM_CERTS", "1")
    env.update(
        HOME=home,
        TMPDIR=tmp,
        XDG_CACHE_HOME=f"{cache}/xdg",
        XDG_CONFIG_HOME=f"{home}/.config",
        UV_CACHE_DIR=f"{cache}/uv",
        PIP_CACHE_DIR=f"{cache}/pip",
        UV_PYTHON_DOWNLOADS="never",
        PYTHONNOUSERSITE="1",
    )
    return env


def _own(path: Path, uid: int, gid: int) -> None:
    """Give `path` and everything below it to `uid`: links not followed,
    and never a file with another name elsewhere (a hard link to a file of
    the host's would hand that file over too)."""
    os.lchown(path, uid, gid)
    for parent, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            entry = os.path.join(parent, name)
            info = os.lstat(entry)
            if stat.S_ISDIR(info.st_mode) or info.st_nlink == 1:
                os.lchown(entry, uid, gid)


def prepare_cache(cache: Path, workdir: Path) -> Path:
    """The download cache: `cache`, a directory the installer owns (on a
    root host); for a host's user that cannot write it (a server that gave
    up root, where root prepared before), one of its own in `workdir`."""
    cache.mkdir(mode=0o700, exist_ok=True)
    info = os.lstat(cache)
    if not stat.S_ISDIR(info.st_mode):
        raise InstallError(f"{cache} is not a directory")
    if confined_as_own_uid():
        if info.st_uid != INSTALLER_UID:
            _own(cache, INSTALLER_UID, INSTALLER_UID)
        os.chmod(cache, 0o700, follow_symlinks=False)
        return cache
    if info.st_uid == os.geteuid() and os.access(cache, os.W_OK | os.X_OK):
        return cache
    (workdir / "cache").mkdir(mode=0o700)
    return workdir / "cache"


# Settings that may name local files or directories: certificates, a
# configuration file, local package directories (`file://` or plain paths).
PATH_SETTINGS = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "PIP_CERT",
    "PIP_CONFIG_FILE",
    "PIP_FIND_LINKS",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "UV_FIND_LINKS",
    "UV_INDEX",
    "UV_INDEX_URL",
    "UV_DEFAULT_INDEX",
    "UV_EXTRA_INDEX_URL",
)


def _reachable(tool: str, env: dict[str, str]) -> list[str]:
    """The directories the installer must be able to enter: this
    interpreter (its prefix and, in a venv, the venv), the tool's directory,
    and the local directories the operator's settings name."""
    paths = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    paths.add(os.path.dirname(os.path.realpath(tool)))
    for name in PATH_SETTINGS:
        for item in env.get(name, "").replace(",", " ").split():
            local = item.removeprefix("file://")
            if os.path.isabs(local) and os.path.exists(local):
                paths.add(local if os.path.isdir(local) else os.path.dirname(local))
    return sorted(os.path.realpath(p) for p in paths)


def _installer_uid() -> int:
    calls = uid_range()
    if INSTALLER_UID in calls:
        raise InstallError(
            f"the installer's uid {INSTALLER_UID} lies in the per-call uids "
            f"{calls.start}..{calls.stop - 1}: choose another PLUGHOST_UID_BASE"
        )
    return INSTALLER_UID


def install(
    workdir: Path,
    cache: Path,
    dependencies: tuple[str, ...],
    lock: str | None,
    allow_sdist: bool,
    progress: Progress,
    deadline_s: float,
) -> Path:
    """Install into `workdir/site`, confined; return that directory.

    `workdir` is a fresh directory of the host's; `lock` a lock's text,
    normalised again here. Raises InstallError (RequirementsError for a
    lock the host refuses; the installer is then never started)."""
    own_uid = confined_as_own_uid()
    uid = _installer_uid() if own_uid else None
    lock_path = _prepare_workdir(workdir, lock, uid)
    cache = prepare_cache(cache, workdir)
    work, cache_seen = (WORK_AT, CACHE_AT) if own_uid else (str(workdir), str(cache))
    command = install_command(
        f"{work}/{SITE}",
        dependencies,
        allow_sdist,
        None if lock_path is None else f"{work}/{LOCK_FILE}",
    )
    env = installer_environment(f"{work}/{HOME}", f"{work}/{TMP}", cache_seen)
    proxy, env = _network(own_uid, env)
    spec = Confinement(
        argv=command,
        env=env,
        writable=[f"{work}/{name}" for name in (SITE, HOME, TMP)] + [cache_seen],
        binds={WORK_AT: str(workdir), CACHE_AT: str(cache)} if own_uid else {},
        reach=_reachable(command[0], env),
        readable=[] if lock_path is None else [f"{work}/{LOCK_FILE}"],
        uid=uid,
        gid=uid,
        proxy_fd=None if proxy is None else proxy.theirs.fileno(),
    )
    where = (
        f"uid {uid}, own mount, PID and network namespaces, the index alone"
        if own_uid
        else "the host's uid"
    )
    progress(f"installer: {Path(command[0]).name}, confined ({where})")
    try:
        run_confined(spec, progress, deadline_s)
    finally:
        if proxy is not None:
            proxy.close()
            for refused in proxy.refused:
                progress(f"installer: refused {refused} (not an index host)")
            if proxy.refused_count > len(proxy.refused):
                progress(f"installer: refused {proxy.refused_count - len(proxy.refused)} more")
    return workdir / SITE


def _prepare_workdir(workdir: Path, lock: str | None, uid: int | None) -> Path | None:
    """The host's copy of the lock (normalised again; its path, None without
    one) and the installer's own directories, in `workdir`."""
    lock_path = None
    if lock is not None:
        text = normalise_lock(lock, LOCK_FILE)
        lock_path = workdir / LOCK_FILE
        fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
    for name in (SITE, HOME, TMP):
        (workdir / name).mkdir(mode=0o700)
        if uid is not None:
            os.lchown(workdir / name, uid, uid)
    os.chmod(workdir, 0o711)  # the installer passes through, and lists nothing
    return lock_path


def _network(own_uid: bool, env: dict[str, str]) -> tuple[IndexProxy | None, dict[str, str]]:
    """A root host's installer has a network namespace of its own: the index
    proxy it reaches the index through, and its environment with that
    proxy's settings in place of the host's. Otherwise none, and `env`."""
    if not own_uid:
        return None, env
    proxy = IndexProxy(index_hosts(os.environ), upstream_of(os.environ))
    env = {k: v for k, v in env.items() if k.upper() not in PROXY_VARIABLES}
    env["HTTPS_PROXY"] = env["HTTP_PROXY"] = f"http://127.0.0.1:{PROXY_PORT}"
    return proxy, env


def run_confined(spec: Confinement, progress: Progress, deadline_s: float) -> None:
    """Run `spec` through `sandbox.confined`, forwarding its output line by
    line; kill it at `deadline_s`. Raises InstallError on a failure."""
    root = str(Path(__file__).resolve().parent.parent)
    helper = "import sys; sys.path.insert(0, sys.argv[2]); from sandbox.confined import main; "
    helper += "sys.exit(main(sys.argv))"
    read_end, write_end = os.pipe()
    with subprocess.Popen(
        [sys.executable, "-I", "-c", helper, str(read_end), root],
        env=spec.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        pass_fds=(read_end,) if spec.proxy_fd is None else (read_end, spec.proxy_fd),
        start_new_session=True,
        text=True,
        errors="replace",
    ) as process:
        os.close(read_end)
        with os.fdopen(write_end, "w") as stream:
            stream.write(spec.to_json())
        # The whole group: on an unprivileged host the installer's own
        # children are in it (on a root host they die with its namespace).
        timer = threading.Timer(deadline_s, _kill_group, (process.pid,))
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
    if status == CONFINEMENT_FAILED and any(t.startswith("confined:") for t in tail):
        raise InstallError("the installer could not be confined: " + " | ".join(tail[-3:]))
    if status != 0:
        raise InstallError(f"the installer exited with status {status}: " + " | ".join(tail[-5:]))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def copy_tree(source: Path, target: Path) -> None:
    """Copy what the installer wrote, as the host's user: directories,
    regular files (without set-id bits) and symbolic links that lead down
    from their directory. Raises InstallError for anything else (a device,
    a fifo, an absolute link or one with `..`)."""
    target.mkdir(mode=0o755)
    for parent, dirs, files in os.walk(source, followlinks=False):
        relative = Path(parent).relative_to(source)
        for name in dirs + files:
            path = Path(parent) / name
            into = target / relative / name
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                link = os.readlink(path)
                # Only links that lead down from where they are: a chain of
                # such links cannot leave the tree, whatever it goes through.
                if os.path.isabs(link) or ".." in Path(link).parts:
                    raise InstallError(f"the installer left a link leading up: {relative / name}")
                os.symlink(link, into)
            elif stat.S_ISDIR(info.st_mode):
                into.mkdir(mode=0o755)
            elif stat.S_ISREG(info.st_mode):
                _copy_file(path, into, info.st_mode & 0o755)
            else:
                raise InstallError(f"the installer left a special file: {relative / name}")


def _copy_file(source: Path, target: Path, mode: int) -> None:
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as reading:
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(out, "wb") as writing:
            shutil.copyfileobj(reading, writing, 1 << 20)


__all__ = [
    "INSTALLER_UID",
    "PASSED_ON",
    "InstallError",
    "copy_tree",
    "find_uv",
    "install",
    "install_command",
    "installer_environment",
]
