"""Claims about the child's isolation, each tested by attacking it."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from host.registry import PluginRegistry
from sandbox.child import THREAD_VARIABLES
from sandbox.layers.mnt import plan_binds
from sandbox.limits import HostLimits
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner
from tests.conftest import write_plugin

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="privilege drop is the root host's defence")


@pytest.fixture
def plugin_root(tmp_path: Path) -> Path:
    # pytest's tmp_path sits below a 0700 directory: the child must still reach
    # the plugin through its private mount namespace.
    return tmp_path / "plugins"


def _add(registry: PluginRegistry, root: Path, name: str, body: str, **limits: object) -> None:
    write_plugin(root, name, body, **limits)
    assert registry.load_directory(root / name) == [name]


@needs_root
def test_plugin_runs_under_an_unprivileged_uid(
    runner: ToolRunner, registry: PluginRegistry, plugin_root: Path, payload: dict
) -> None:
    _add(
        registry,
        plugin_root,
        "whoami",
        "return {'uid': os.getuid(), 'gid': os.getgid(), "
        "'groups': os.getgroups(), 'cwd': os.getcwd()}",
    )
    result, error = runner.run("whoami", payload)
    assert error == {}
    assert result["uid"] != 0 and result["gid"] != 0 and result["groups"] == []
    assert result["cwd"] == "/tmp/work"


@needs_root
def test_plugin_cannot_read_a_file_only_root_may_read(
    runner: ToolRunner, registry: PluginRegistry, plugin_root: Path, payload: dict
) -> None:
    # Inside the plugin's own directory, which the minimal root does contain.
    secret = plugin_root / "thief" / "secret.txt"
    _add(registry, plugin_root, "thief", f"return {{'data': open({str(secret)!r}).read()}}")
    secret.write_text("root only")
    secret.chmod(0o600)
    result, error = runner.run("thief", payload)
    assert result == {}
    assert "Permission denied" in error["error"]["message"]


@needs_root
def test_plugin_cannot_signal_the_host(
    runner: ToolRunner, registry: PluginRegistry, plugin_root: Path, payload: dict
) -> None:
    received: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        _add(
            registry,
            plugin_root,
            "signaller",
            f"os.kill({os.getpid()}, signal.SIGUSR1)\nreturn {{}}",
        )
        result, error = runner.run("signaller", payload)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == []
    # EPERM with a uid of its own; ESRCH when the host is outside its PID namespace.
    assert error["error"]["details"]["exception"] in {"PermissionError", "ProcessLookupError"}


@needs_root
def test_plugin_cannot_exceed_its_process_cap(
    runner: ToolRunner, registry: PluginRegistry, plugin_root: Path, payload: dict
) -> None:
    body = """
started = 0
try:
    for _ in range(200):
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        started += 1
except OSError:
    pass
return {'started': started}
"""
    _add(registry, plugin_root, "forker", body)
    result, error = runner.run("forker", payload)
    assert error == {}
    # The cap counts the plugin's own process too.
    assert result["started"] == runner.limits.max_processes - 1


def test_grandchild_is_killed_with_the_call(
    runner: ToolRunner, registry: PluginRegistry, plugin_root: Path, payload: dict
) -> None:
    body = """
import subprocess
child = subprocess.Popen(['setsid', 'sleep', '300'])
with open('pid', 'w') as f:
    f.write(str(child.pid))
time.sleep(300)
"""
    _add(registry, plugin_root, "spawner", body, timeout_s=1)
    _, error = runner.run("spawner", payload)
    assert error["error"]["details"]["reason"] == "timeout"
    # The leak check of conftest asserts no process of the call is left.


def test_scratch_directory_is_private_and_removed(
    runner: ToolRunner, registry: PluginRegistry, plugin_root: Path, payload: dict
) -> None:
    body = """
with open('note.txt', 'w') as f:
    f.write('x')
return {'listing': sorted(os.listdir('.')), 'where': os.path.realpath('.'), 'env': dict(os.environ)}
"""
    _add(registry, plugin_root, "scribe", body)
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("plughost-call-*"))
    result, error = runner.run("scribe", payload)
    assert error == {}
    assert result["listing"] == ["note.txt"]
    # The safe variables, the scratch's, and the thread pools' sizes only.
    assert set(result["env"]) <= {"PATH", "LANG", "HOME", "TMPDIR", *THREAD_VARIABLES}
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("plughost-call-*")) == before


def test_calls_of_one_launcher_with_other_cpus_limits_each_get_their_own_environment(
    registry: PluginRegistry, sandbox: Sandbox, plugin_root: Path, payload: dict
) -> None:
    # The launcher takes the environment of a call in a minimal root as its
    # own, so that such a child changes none (sandbox.inherited.prepare): a
    # call with another cpus limit must not see the last call's.
    body = "return {'env': dict(os.environ), 'cpus': os.cpu_count()}"
    _add(registry, plugin_root, "environ_reader", body)
    runners = {cpus: ToolRunner(registry, sandbox, HostLimits(cpus=cpus)) for cpus in (1, 2)}
    for cpus in (1, 2, 2, 1):
        result, error = runners[cpus].run("environ_reader", payload)
        assert error == {}, error
        threads = min(cpus, len(os.sched_getaffinity(0)))
        home = result["env"].get("HOME")
        wanted = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        wanted |= {"HOME": home, "TMPDIR": home} | dict.fromkeys(THREAD_VARIABLES, str(threads))
        assert result["env"] == wanted, cpus
        assert result["cpus"] == threads
        assert home and Path(home).name != ""


def test_child_inherits_no_descriptor_but_its_own(
    runner: ToolRunner, registry: PluginRegistry, plugin_root: Path, payload: dict
) -> None:
    body = "return {'fds': sorted(int(f) for f in os.listdir('/proc/self/fd'))}"
    _add(registry, plugin_root, "fdlister", body)
    result, error = runner.run("fdlister", payload)
    assert error == {}
    # stdin, stdout, stderr, the reply pipe, and the descriptor listdir opened.
    assert result["fds"][:4] == [0, 1, 2, 3]
    assert len(result["fds"]) == 5


def test_stdin_is_dev_null(
    runner: ToolRunner, registry: PluginRegistry, plugin_root: Path, payload: dict
) -> None:
    _add(registry, plugin_root, "reader", "return {'stdin': sys.stdin.read()}")
    result, error = runner.run("reader", payload)
    assert error == {} and result == {"stdin": ""}


def test_bind_plan_keeps_outermost_paths_and_drops_missing_ones(tmp_path: Path) -> None:
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    plan = plan_binds([str(inner), str(inner / "c"), str(tmp_path / "missing"), "/usr/lib"])
    assert str(inner) in plan
    assert not any(p.startswith(str(tmp_path / "missing")) for p in plan)
    assert "/usr" in plan and "/usr/lib" not in plan  # inside /usr, bound anyway
    assert plan.index("/usr") < plan.index(str(inner))  # outermost first


@needs_root
def test_plugin_sees_only_the_minimal_root(
    runner: ToolRunner, registry: PluginRegistry, plugin_root: Path, payload: dict
) -> None:
    # exists() is stat(), which Landlock does not govern: only an absent path is safe.
    host_paths = ["/etc/shadow", "/etc/passwd", "/run", "/var", "/home", "/sys/fs/cgroup"]
    host_paths += [str(Path(__file__).resolve()), str(Path(__file__).parents[2] / "pyproject.toml")]
    body = f"""
import os, os.path, json
paths = {host_paths!r}
return {{
    "host": [p for p in paths if os.path.exists(p)],
    "own": os.path.exists(os.path.dirname(__file__)),
    "stdlib": os.path.exists(json.__file__),
    "cwd": os.getcwd(),
}}
"""
    _add(registry, plugin_root, "looker", body)
    result, error = runner.run("looker", payload)
    assert error == {}
    assert result == {"host": [], "own": True, "stdlib": True, "cwd": "/tmp/work"}


@needs_root
def test_minimal_root_never_widens_host_permissions(
    runner: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    hidden = tmp_path / "hidden"
    _add(registry, hidden, "inside", "return {'ok': True}")
    hidden.chmod(0o700)
    result, error = runner.run("inside", payload)
    assert error == {} and result == {"ok": True}
    assert stat.S_IMODE(hidden.stat().st_mode) == 0o700


# /dev/shm is the call's own tmpfs (test_real_plugins.py checks that what it
# writes there never reaches the host's).
@needs_root
@pytest.mark.parametrize("target", ["/tmp/escape", "/var/tmp/escape", "PLUGIN_DIR"])
def test_plugin_cannot_write_outside_its_scratch_directory(
    runner: ToolRunner, registry: PluginRegistry, plugin_root: Path, payload: dict, target: str
) -> None:
    path = str(plugin_root / "writer" / "escape") if target == "PLUGIN_DIR" else target
    _add(registry, plugin_root, "writer", f"open({path!r}, 'w').write('x')\nreturn {{}}")
    result, error = runner.run("writer", payload)
    assert result == {}
    exception = error["error"]["details"]["exception"]
    assert exception in {"PermissionError", "OSError", "FileNotFoundError"}
    assert not Path(path).exists()


@needs_root
def test_scratch_directory_cannot_fill_the_disk(
    runner: ToolRunner, registry: PluginRegistry, plugin_root: Path, payload: dict
) -> None:
    body = """
written = 0
try:
    for i in range(1000):
        with open(f'blob{i}', 'wb') as f:
            f.write(b'x' * (4 * 1024 * 1024))
        written += 4
except OSError as exc:
    return {'written_mb': written, 'error': exc.errno}
return {'written_mb': written}
"""
    _add(registry, plugin_root, "filler", body, memory_mb=256)
    result, error = runner.run("filler", payload)
    assert error == {}
    assert result["written_mb"] <= runner.limits.scratch_mb
    assert result["error"] == 28  # ENOSPC


def test_daemon_that_races_the_kill_never_survives(runner: ToolRunner, payload: dict) -> None:
    # The plugin returns while its double-forked daemon is being born: a
    # scan-then-kill sweep misses the newborn now and then; kill(-1) does not.
    from tests.conftest import sandbox_processes

    survivors = []
    for _ in range(25):
        result, error = runner.run("daemon_grandchild", payload)
        assert error == {}
        runner.sandbox.settle()  # the call's processes are put away right after it returns
        survivors += [
            p.pid
            for p in sandbox_processes(runner.sandbox.launcher.pid)
            if p.info["status"] != "zombie"
        ]
    assert survivors == []


def test_plugin_sees_none_of_the_launchers_own_modules(
    runner: ToolRunner, registry: PluginRegistry, plugin_root: Path, payload: dict
) -> None:
    # The launcher works out once which of its modules a call forgets; each
    # call must still see none of them, on the first call and on later ones.
    _add(
        registry,
        plugin_root,
        "own_modules",
        "import importlib.util\n"
        "loaded = sorted(n for n in sys.modules if n.split('.')[0] in "
        "('sandbox', 'pydantic', 'psutil', 'host'))\n"
        "findable = [n for n in ('sandbox', 'pydantic', 'psutil') "
        "if importlib.util.find_spec(n) is not None]\n"
        "hooks = [type(f).__module__ for f in sys.meta_path]\n"
        "return {'loaded': loaded, 'findable': findable, 'hooks': hooks, 'path': sys.path}",
    )
    for _ in range(3):
        result, error = runner.run("own_modules", payload)
        assert error == {}
        assert result["loaded"] == [] and result["findable"] == []
        assert not any(
            hook.startswith(("sandbox", "_distutils", "__editable")) for hook in result["hooks"]
        )
