"""The package installer: the options no requirements file can override,
and what it can see and touch while it runs.

A fake installer (a script standing in for uv) reports from inside the
confinement what it was given and what it could do; `uv` itself builds an
allowed source distribution to show that build code runs just as confined.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from host.environments import EnvironmentStore, EnvStatus, Requirements
from host.indexproxy import index_hosts
from host.installer import INSTALLER_UID, install_command
from host.requirements import normalise_lock
from sandbox.confined import PROXY_PORT

pytestmark = pytest.mark.timeout(300)
ROOT = os.geteuid() == 0
HASH = "sha256:" + "ab" * 32

FAKE_INSTALLER = """#!{python}
import json, os, sys

target = sys.argv[sys.argv.index("--target") + 1]
facts = {{"argv": sys.argv, "env": dict(os.environ), "uid": os.getuid(), "gid": os.getgid(),
          "groups": os.getgroups(), "pid": os.getpid(), "wrote": [], "read": [],
          "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}}
for place in {probes!r}:
    try:
        with open(os.path.join(place, "written-by-the-installer"), "w") as stream:
            stream.write("x")
        facts["wrote"].append(place)
    except OSError:
        pass
for secret in {secrets!r}:
    try:
        with open(secret) as stream:
            facts["read"].append(stream.read())
    except OSError:
        pass
if "-r" in sys.argv:
    with open(sys.argv[sys.argv.index("-r") + 1]) as stream:
        facts["lock"] = stream.read()
with open(os.path.join(target, "facts.json"), "w") as stream:
    json.dump(facts, stream)
print("fake installer: installed into", target)
"""


@pytest.fixture
def writable_elsewhere() -> Iterator[Path]:
    """A directory anyone may write, outside /tmp (which the installer's
    namespace replaces): only Landlock and the uid keep the installer out."""
    place = Path(tempfile.mkdtemp(prefix="plughost-test-", dir="/var/lib" if ROOT else None))
    place.chmod(0o777)
    yield place
    for entry in place.iterdir():
        entry.unlink()
    place.rmdir()


def _fake(tmp_path: Path, probes: list[str], secrets: list[str]) -> str:
    tool = tmp_path / "bin" / "uv"
    tool.parent.mkdir()
    tool.write_text(FAKE_INSTALLER.format(python=sys.executable, probes=probes, secrets=secrets))
    tool.chmod(0o755)
    return str(tool)


def _facts(state_path: Path | None) -> dict[str, object]:
    assert state_path is not None
    facts: dict[str, object] = json.loads((state_path / "facts.json").read_text())
    return facts


def test_install_command_carries_the_hosts_options_and_the_hosts_lock() -> None:
    locked = install_command("/t/site", (), False, "/t/requirements.lock", uv="/bin/uv")
    assert locked[-4:] == ["--require-hashes", "--no-deps", "-r", "/t/requirements.lock"]
    assert "--no-build" in locked and "--no-config" in locked
    plain = install_command("/t/site", ("six==1.17.0",), False, None, uv="/bin/uv")
    assert plain[-2:] == ["--", "six==1.17.0"] and "--no-build" in plain
    pip = install_command("/t/site", ("six",), False, "/t/requirements.lock", uv=None)
    if pip[0] == sys.executable:
        assert "--only-binary=:all:" in pip and "--require-hashes" in pip
    allowed = install_command("/t/site", ("six",), True, None, uv="/bin/uv")
    assert "--no-build" not in allowed
    with pytest.raises(ValueError, match="installer option"):
        install_command("/t/site", ("--no-binary=:all:",), False, None, uv="/bin/uv")


def test_the_installer_is_given_the_hosts_lock_and_an_environment_without_host_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLUGHOST_ADMIN_TOKEN", "admin-secret-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("DATABASE_URL", "postgresql://user:password@db/plughost")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    tool = _fake(tmp_path, [], [])
    monkeypatch.setattr("host.installer.find_uv", lambda: tool)
    lock = f"# header\nsix==1.17.0 \\\n    --hash={HASH}\n"
    store = EnvironmentStore(tmp_path / "envs")
    state = store.prepare("p", Requirements((), normalise_lock(lock, "l"), "p/requirements.lock"))
    assert state.status is EnvStatus.READY, state.message
    facts = _facts(state.path)
    env = facts["env"]
    assert isinstance(env, dict)
    for secret in ("PLUGHOST_ADMIN_TOKEN", "AWS_SECRET_ACCESS_KEY", "DATABASE_URL"):
        assert secret not in env
    # What the index needs stays: the host's own proxy, or on a root host (its
    # own network namespace) the index proxy, which goes through the host's.
    wanted = f"http://127.0.0.1:{PROXY_PORT}" if ROOT else "http://proxy.internal:3128"
    assert env["HTTPS_PROXY"] == wanted
    assert env["HOME"] != os.environ.get("HOME") and env["HOME"].endswith("/home")
    assert facts["lock"] == f"six==1.17.0 --hash={HASH}\n"
    argv = facts["argv"]
    assert isinstance(argv, list)
    assert ["--require-hashes", "--no-deps", "-r"] == argv[-4:-1] and "--no-build" in argv


@pytest.mark.skipif(not ROOT, reason="a root host gives the installer its own uid")
def test_the_installer_runs_as_its_own_uid_and_writes_only_its_own_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writable_elsewhere: Path
) -> None:
    shared_tmp = Path(tempfile.mkdtemp(prefix="plughost-test-"))
    shared_tmp.chmod(0o777)
    root_only = tmp_path / "root-only-secret"
    root_only.write_text("the host's secret")
    root_only.chmod(0o600)
    # World-readable, outside the system's directories: what another plugin's
    # directory or an operator's home holds. Only Landlock keeps it unread.
    world_readable = writable_elsewhere / "world-readable"
    world_readable.write_text("another plugin's file")
    world_readable.chmod(0o644)
    probes = [str(writable_elsewhere), str(shared_tmp), "/dev/shm", "/var/tmp", str(tmp_path)]
    secrets = [str(root_only), "/etc/shadow", str(world_readable)]
    tool = _fake(tmp_path, probes, secrets)
    monkeypatch.setattr("host.installer.find_uv", lambda: tool)
    store = EnvironmentStore(tmp_path / "envs")
    state = store.prepare("p", Requirements(("six==1.17.0",), None, "p/plugin.toml"))
    assert state.status is EnvStatus.READY, state.message
    facts = _facts(state.path)
    assert facts["uid"] == INSTALLER_UID and facts["gid"] == INSTALLER_UID
    assert facts["groups"] == []
    assert facts["pid"] == 1  # the init of a PID namespace of its own: nothing outlives it
    assert facts["processes"] == [1]  # and its /proc lists no process of the host's
    assert facts["wrote"] == [] and facts["read"] == []
    assert list(writable_elsewhere.iterdir()) == [world_readable]
    assert not any(shared_tmp.iterdir())
    shared_tmp.rmdir()
    # The environment is the host's copy: nothing in it belongs to the installer.
    assert state.path is not None
    for path in [state.path, *state.path.rglob("*")]:
        assert path.lstat().st_uid == os.geteuid(), path


def test_an_installer_as_the_hosts_own_uid_reads_only_the_system_and_its_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unprivileged host's installer runs as the host's own uid: its job
    store and its users' files are the uid's to read, and Landlock alone
    keeps them from the installer (and from a build it runs)."""
    job_store = tmp_path / "state" / "jobs.db"
    job_store.parent.mkdir()
    job_store.write_text("another client's inputs")
    job_store.chmod(0o600)
    tool = _fake(tmp_path, [str(job_store.parent)], [str(job_store), "/etc/hostname"])
    monkeypatch.setattr("host.installer.find_uv", lambda: tool)
    monkeypatch.setattr("host.installer.confined_as_own_uid", lambda: False)
    lock = f"six==1.17.0 --hash={HASH}\n"
    store = EnvironmentStore(tmp_path / "envs")
    state = store.prepare("p", Requirements((), normalise_lock(lock, "l"), "p/requirements.lock"))
    assert state.status is EnvStatus.READY, state.message
    facts = _facts(state.path)
    assert facts["uid"] == os.geteuid()
    assert facts["lock"] == lock  # the host's copy of the lock: readable
    # /etc is the system's: readable; the job store is not, nor writable.
    assert facts["read"] == (
        [Path("/etc/hostname").read_text()] if Path("/etc/hostname").exists() else []
    )
    assert facts["wrote"] == []


NETWORK_PROBE = """#!{python}
import json, os, socket, sys

target = sys.argv[sys.argv.index("--target") + 1]
facts = {{"proxy": os.environ.get("HTTPS_PROXY")}}
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
    facts["direct"] = "connected"
except OSError as exc:
    facts["direct"] = type(exc).__name__


def through_proxy(where):
    host, port = os.environ["HTTPS_PROXY"].removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(("CONNECT %s HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n" % (where, where)).encode())
        return conn.recv(200).split(b"\\r\\n")[0].decode()


facts["host_loopback"] = through_proxy("127.0.0.1:{port}")
facts["elsewhere"] = through_proxy("example.com:443")
facts["index"] = through_proxy("pypi.org:443")
with open(os.path.join(target, "facts.json"), "w") as stream:
    json.dump(facts, stream)
"""


@pytest.mark.skipif(not ROOT, reason="a root host gives the installer its own network namespace")
def test_the_installer_reaches_the_package_index_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service on the host's loopback is out of the installer's reach,
    directly and through its proxy; so is any host but the index's."""
    service = socket.create_server(("127.0.0.1", 0))
    service.settimeout(0.1)
    port = service.getsockname()[1]
    tool = tmp_path / "bin" / "uv"
    tool.parent.mkdir()
    tool.write_text(NETWORK_PROBE.format(python=sys.executable, port=port))
    tool.chmod(0o755)
    monkeypatch.setattr("host.installer.find_uv", lambda: str(tool))
    store = EnvironmentStore(tmp_path / "envs")
    with service:
        state = store.prepare("p", Requirements(("six==1.17.0",), None, "p/plugin.toml"))
        with pytest.raises(TimeoutError):
            service.accept()  # nobody ever connected to the host's service
    assert state.status is EnvStatus.READY, state.message
    facts = _facts(state.path)
    assert facts["proxy"] == f"http://127.0.0.1:{PROXY_PORT}"
    assert facts["direct"] == "ConnectionRefusedError"  # its own loopback: nothing there
    assert facts["host_loopback"] == facts["elsewhere"] == "HTTP/1.1 403 Forbidden"
    assert facts["index"] == "HTTP/1.1 200 Connection established"


def test_index_hosts_are_pypis_and_those_the_operators_settings_name() -> None:
    hosts = index_hosts(
        {
            "PIP_INDEX_URL": "https://mirror.example/simple",
            "UV_INDEX": "internal=http://10.0.0.5:3141/root/pypi,https://other.example/simple",
            "PIP_FIND_LINKS": "/opt/wheels",
            "PLUGHOST_INDEX_HOSTS": "cdn.example, files.example:8443",
        }
    )
    assert hosts == {
        ("pypi.org", 443),
        ("files.pythonhosted.org", 443),
        ("mirror.example", 443),
        ("10.0.0.5", 3141),
        ("other.example", 443),
        ("cdn.example", 443),
        ("files.example", 8443),
    }


def test_an_installer_that_cannot_be_confined_is_never_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = _fake(tmp_path, [], [])
    monkeypatch.setattr("host.installer.find_uv", lambda: tool)
    # A uid range that takes in the installer's uid: refused before any start.
    monkeypatch.setenv("PLUGHOST_UID_BASE", str(INSTALLER_UID - 10))
    store = EnvironmentStore(tmp_path / "envs")
    state = store.prepare("p", Requirements(("six==1.17.0",), None, "p/plugin.toml"))
    if ROOT:
        assert state.status is EnvStatus.FAILED and "per-call uids" in state.message
    else:
        assert state.status is EnvStatus.READY, state.message


def _sdist(where: Path, marker: Path) -> None:
    """buildme-1.0.tar.gz, whose build records what its build code could do."""
    setup = textwrap.dedent(
        f"""
        import os, pathlib
        from setuptools import setup
        try:
            pathlib.Path({str(marker)!r}).write_text("build code ran here")
            wrote = True
        except OSError:
            wrote = False
        pathlib.Path("buildme.py").write_text(
            f"WROTE_OUTSIDE = {{wrote!r}}\\n"
            f"SECRET = {{os.environ.get('PLUGHOST_ADMIN_TOKEN')!r}}\\n"
            f"UID = {{os.getuid()}}\\n"
        )
        setup(name="buildme", version="1.0", py_modules=["buildme"])
        """
    )
    source = where / "src" / "buildme-1.0"
    source.mkdir(parents=True)
    (source / "setup.py").write_text(setup)
    (source / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: buildme\nVersion: 1.0\n")
    with tarfile.open(where / "buildme-1.0.tar.gz", "w:gz") as archive:
        archive.add(source, arcname="buildme-1.0")


def test_an_allowed_source_build_runs_confined_and_a_refused_one_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writable_elsewhere: Path
) -> None:
    links = tmp_path / "links"
    links.mkdir()
    marker = writable_elsewhere / "build-code-ran"
    _sdist(links, marker)
    # The operator's local package directory, through the installer's settings.
    monkeypatch.setenv("UV_FIND_LINKS", str(links))
    monkeypatch.setenv("PLUGHOST_ADMIN_TOKEN", "admin-secret-token")
    wanted = Requirements(("buildme==1.0",), source="s/plugin.toml")
    refused = EnvironmentStore(tmp_path / "envs").prepare("s", wanted)
    assert refused.status is EnvStatus.FAILED
    assert not marker.exists()
    allowed = EnvironmentStore(tmp_path / "envs", allow_sdist=("s",)).prepare("s", wanted)
    assert allowed.status is EnvStatus.READY, allowed.message
    assert allowed.path is not None
    probe = f"import sys; sys.path.insert(0, {str(allowed.path)!r}); import buildme as b; "
    probe += "print(b.WROTE_OUTSIDE, b.SECRET, b.UID)"
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, check=True
    )
    wrote, secret, uid = out.stdout.split()
    assert wrote == "False" and not marker.exists()
    assert secret == "None"
    assert int(uid) == (INSTALLER_UID if ROOT else os.geteuid())
