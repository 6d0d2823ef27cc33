"""Shared fixtures: a registry with the bundled and hostile plugins, sample
images, a leak check around every test that runs a sandbox, and a private
PostgreSQL server (`pg`, `db_url`) for the tests of the shared store."""

from __future__ import annotations

import io
import os
import pwd
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
from PIL import Image, ImageDraw

from host.discovery import BUNDLED_DIR, discover
from host.environments import EnvironmentStore, EnvStatus
from host.preparation import environment_store, prepare_all
from host.registry import PluginRegistry, get_registry
from sandbox.cgroups import host_id
from sandbox.supervisor import Sandbox, uid_range
from sandbox.tool_runner import ToolRunner

# A uid range of the test run's own: a plughost server running on the same
# machine must not be mistaken for processes the tests left behind. Every
# Sandbox reads it when it is made, and the servers the tests start inherit it.
os.environ.setdefault("PLUGHOST_UID_BASE", "1600000")
# One store of plugin environments for the whole run (the bundled plugins'
# Pillow is prepared once): this process, and the servers and CLI commands
# the tests start, all read it. Kept between runs, as an operator's would be.
os.environ.setdefault("PLUGHOST_ENV_DIR", "/var/tmp/plughost-test-envs")

if TYPE_CHECKING:
    from tests.cluster.pg import PgCluster

HOSTILE_DIR = BUNDLED_DIR / "hostile"


def make_png(
    width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    image = Image.new("RGB", (width, height), color)
    draw = ImageDraw.Draw(image)
    draw.rectangle([width // 4, height // 4, width // 2, height // 2], fill=(20, 20, 220))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Return once `condition()` holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def png() -> bytes:
    return make_png()


@pytest.fixture
def payload(png: bytes) -> dict[str, object]:
    return {"image": png, "mime_type": "image/png", "options": {}}


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """The test run's sandbox (one launcher), closed when the run ends."""
    box = Sandbox()
    yield box
    box.close()


ENV_DIR = os.environ["PLUGHOST_ENV_DIR"]


@pytest.fixture(scope="session", autouse=True)
def plugin_environments() -> EnvironmentStore:
    """The bundled plugins' environments, prepared once, before any test runs
    a call (preparation never happens inside one); every test registry, and the
    process-wide one, uses them."""
    store = environment_store(ENV_DIR)
    bundled = PluginRegistry()
    bundled.environments = store
    discover(bundled)
    states = prepare_all(bundled)
    assert all(s.status is EnvStatus.READY for s in states.values()), states
    get_registry().environments = store
    return store


@pytest.fixture
def registry(plugin_environments: EnvironmentStore) -> PluginRegistry:
    """A registry of the bundled and hostile plugins."""
    reg = PluginRegistry()
    reg.environments = plugin_environments
    discover(reg, [HOSTILE_DIR])
    return reg


@pytest.fixture
def runner(registry: PluginRegistry, sandbox: Sandbox) -> ToolRunner:
    return ToolRunner(registry, sandbox)


def sandbox_processes(launcher: int | None) -> list[psutil.Process]:
    """Processes that belong to some call: a sandbox uid, or a child of the
    launcher that is not one of its slots' holders."""
    uids = uid_range()
    found = []
    for proc in psutil.process_iter(["uids", "ppid", "status"]):
        uid = proc.info["uids"].real if proc.info["uids"] else -1
        if uid in uids or (launcher and proc.info["ppid"] == launcher and not _holder(proc.pid)):
            found.append(proc)
    return found


def _holder(pid: int) -> bool:
    """A slot's holder (sandbox.layers.shared): root, and the init of a PID
    namespace. A call's processes are neither (its init, on a host without
    slots, has the call's uid); whatever a call leaves in a slot is counted
    by its uid."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    nspid = fields.get("NSpid", "").split()
    return fields.get("Uid", "").split()[:1] == ["0"] and len(nspid) > 1 and nspid[-1] == "1"


def call_cgroups() -> set[str]:
    """This test process's call cgroups (another host on the machine has its own)."""
    return {
        str(p)
        for c in ("memory", "pids")
        for p in Path(f"/sys/fs/cgroup/{c}/plughost").glob(f"call-{host_id()}-*")
    }


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a sandbox process or a host descriptor behind."""
    if "no_leak_check" in request.keywords:
        yield
        return
    box: Sandbox = request.getfixturevalue("sandbox")  # its launcher's fds are not a leak
    host_id()  # nor is the host's lock, held for the process's lifetime
    before = open_fds()
    cgroups_before = call_cgroups()
    yield
    box.settle()  # a call's processes, cgroup and uid are put away right after it returns
    deadline = time.monotonic() + 3
    while sandbox_processes(box.launcher.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = [(p.pid, p.info["status"]) for p in sandbox_processes(box.launcher.pid)]
    assert not left, f"processes left behind: {left}"
    # Kept for their uids' next calls (sandbox.cgroups.CgroupPool): empty.
    kept = {str(path) for path in box.kept_cgroups()}
    assert all(not (Path(path) / "cgroup.procs").read_text().strip() for path in kept)
    assert call_cgroups() - kept <= cgroups_before, "cgroups left behind"
    leaked = open_fds() - before
    # The launcher socket may be opened by the first call of the session.
    launcher_sock = {fd for fd in leaked if _is_launcher_socket(fd)}
    assert not leaked - launcher_sock, f"descriptors left open: {sorted(leaked - launcher_sock)}"


def _is_launcher_socket(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    except OSError:
        return False


def ensure_user(name: str) -> int:
    """The uid of system user `name`, created if missing (tests that run a
    host or a server as an ordinary user)."""
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            timeout=30,
        )
        return pwd.getpwnam(name).pw_uid


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    """One private PostgreSQL server for the session (tests/cluster/pg.py)."""
    from tests.cluster.pg import PgCluster  # it imports this module

    cluster = PgCluster()
    yield cluster
    cluster.close()


@pytest.fixture
def db_url(pg: PgCluster) -> str:
    """A fresh database on the session's server."""
    return pg.database("t" + uuid.uuid4().hex[:12])


def write_plugin(
    root: Path, name: str, body: str, timeout_s: float = 5, memory_mb: int = 128
) -> Path:
    """Write a one-file plugin whose `run(self, payload)` has `body`; return its dir."""
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "plugin.toml").write_text(
        f'name = "{name}"\nversion = "0.1.0"\nentrypoint = "{name}_mod:Plugin"\n'
        f"[limits]\ntimeout_s = {timeout_s}\nmemory_mb = {memory_mb}\n"
    )
    indented = "\n".join("        " + line for line in body.strip().splitlines())
    (directory / f"{name}_mod.py").write_text(
        "import os, sys, time, signal\n\n\nclass Plugin:\n    def run(self, payload):\n"
        + indented
        + "\n"
    )
    return directory
