"""Each hardening layer, attacked with it on and with it switched off: the
attack fails with the layer, and succeeds (or is reported) without it."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from host.registry import PluginRegistry
from sandbox.layers import detect
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner
from tests.conftest import write_plugin

AVAILABLE = detect()


def needs(*layers: str) -> pytest.MarkDecorator:
    missing = [layer for layer in layers if not AVAILABLE.get(layer)]
    return pytest.mark.skipif(bool(missing), reason=f"this machine lacks {', '.join(missing)}")


@pytest.fixture
def make_runner() -> Iterator[Callable[..., ToolRunner]]:
    sandboxes: list[Sandbox] = []

    def make(**kwargs: object) -> ToolRunner:
        sandbox = Sandbox(**kwargs)  # type: ignore[arg-type]
        sandboxes.append(sandbox)
        return ToolRunner(sandbox=sandbox)

    yield make
    for sandbox in sandboxes:
        sandbox.launcher.stop()


@pytest.fixture
def listener() -> Iterator[tuple[int, list[int]]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.1)
    accepted: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    yield int(sock.getsockname()[1]), accepted
    stop.set()
    thread.join(5)
    sock.close()


def _add(registry: PluginRegistry, tmp_path: Path, name: str, body: str) -> None:
    write_plugin(tmp_path, name, body)
    assert registry.load_directory(tmp_path / name) == [name]


CONNECT = (
    "import socket\n"
    "with socket.create_connection(('127.0.0.1', payload['options']['port']), timeout=1):\n"
    "    return {'connected': True}"
)


@needs("network_namespace")
def test_plugin_cannot_reach_a_server_on_the_hosts_loopback(
    registry: PluginRegistry,
    tmp_path: Path,
    payload: dict,
    listener: tuple[int, list[int]],
    make_runner: Callable[..., ToolRunner],
) -> None:
    port, accepted = listener
    _add(registry, tmp_path, "connector", CONNECT)
    payload = {**payload, "options": {"port": port}}
    result, error = make_runner().run("connector", payload)
    assert result == {} and error["error"]["details"]["reason"] == "plugin_raised"
    assert accepted == []
    # The same plugin with the network layers off reaches the server: the layers did it.
    loose = make_runner(disabled=["network_namespace", "landlock"])
    assert loose.sandbox.protections()["network_namespace"] is False
    result, error = loose.run("connector", payload)
    assert error == {} and result == {"connected": True} and accepted == [1]


@needs("network_namespace")
def test_plugin_sees_only_loopback(registry: PluginRegistry, tmp_path: Path, payload: dict) -> None:
    write_plugin(
        tmp_path, "ifaces", "return {'ifaces': [name for _, name in socket.if_nameindex()]}"
    )
    module = tmp_path / "ifaces" / "ifaces_mod.py"
    module.write_text("import socket\n" + module.read_text())
    assert registry.load_directory(tmp_path / "ifaces") == ["ifaces"]
    result, error = ToolRunner().run("ifaces", payload)
    assert error == {} and result == {"ifaces": ["lo"]}


@needs("landlock")
def test_landlock_denies_what_the_minimal_root_leaves_readable(
    registry: PluginRegistry, tmp_path: Path, payload: dict, make_runner: Callable[..., ToolRunner]
) -> None:
    # The minimal root holds no host file; Landlock still stands behind it:
    # the root directory itself is not among the paths a plugin may read.
    _add(registry, tmp_path, "lister", "return {'root': sorted(os.listdir('/'))}")
    result, error = ToolRunner().run("lister", payload)
    assert result == {} and error["error"]["details"]["exception"] == "PermissionError"
    result, error = make_runner(disabled=["landlock"]).run("lister", payload)
    assert error == {} and {"usr", "tmp", "proc", "dev"} <= set(result["root"])
    assert not {"run", "var", "home", "boot", "srv"} & set(result["root"])


@needs("seccomp")
def test_seccomp_denies_what_a_plugin_never_needs(
    registry: PluginRegistry, tmp_path: Path, payload: dict, make_runner: Callable[..., ToolRunner]
) -> None:
    body = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "return {'ptrace': libc.ptrace(0, 0, 0, 0), 'errno': ctypes.get_errno()}"
    )
    _add(registry, tmp_path, "tracer", body)
    result, error = ToolRunner().run("tracer", payload)
    assert error == {} and result == {"ptrace": -1, "errno": 1}  # EPERM from the filter
    result, error = make_runner(disabled=["seccomp"]).run("tracer", payload)
    assert error == {} and result["ptrace"] == 0


@needs("pid_namespace")
def test_plugin_sees_no_host_process(
    registry: PluginRegistry, tmp_path: Path, payload: dict, make_runner: Callable[..., ToolRunner]
) -> None:
    body = (
        "return {'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),"
        " 'me': os.getpid()}"
    )
    _add(registry, tmp_path, "ps", body)
    result, error = ToolRunner().run("ps", payload)
    assert error == {}
    assert result["pids"] == [1, result["me"]]  # its namespace's init and itself
    result, error = make_runner(disabled=["pid_namespace"]).run("ps", payload)
    assert error == {} and os.getpid() in result["pids"]


@needs("cgroup_memory", "cgroup_pids")
def test_each_call_gets_cgroups_that_are_removed_after_it(
    registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    body = "return {'cgroups': open('/proc/self/cgroup').read()}"
    _add(registry, tmp_path, "cg", body)
    # (The leak check of conftest asserts no call-* cgroup is left behind.)
    result, error = ToolRunner().run("cg", payload)
    assert error == {}
    lines = {line.split(":")[1]: line.split(":")[2] for line in result["cgroups"].splitlines()}
    assert "/plughost/call-" in lines["memory"] and "/plughost/call-" in lines["pids"]
    name = lines["memory"].rsplit("/", 1)[1]
    for controller in ("memory", "pids"):
        assert not (Path(f"/sys/fs/cgroup/{controller}/plughost") / name).exists()


@needs("cgroup_memory")
def test_memory_written_to_the_scratch_tmpfs_counts_against_the_limit(
    registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    # tmpfs pages are not in any process's RSS; the call's memory cgroup sees them.
    body = """
written = 0
for i in range(60):
    with open(f'blob{i}', 'wb') as f:
        f.write(os.urandom(1024 * 1024))
    written += 1
time.sleep(2)
return {'written_mb': written}
"""
    write_plugin(tmp_path, "tmpfs_hog", body, timeout_s=5, memory_mb=40)
    assert registry.load_directory(tmp_path / "tmpfs_hog") == ["tmpfs_hog"]
    result, error = ToolRunner().run("tmpfs_hog", payload)
    assert result == {} and error["error"]["details"]["reason"] == "memory_limit"


def test_strict_isolation_refuses_to_run_without_every_layer(
    registry: PluginRegistry, payload: dict, make_runner: Callable[..., ToolRunner]
) -> None:
    runner = make_runner(isolation="strict", disabled=["seccomp"])
    result, error = runner.run("image_info", payload)
    assert result == {}
    assert error["error"]["type"] == "InternalError"
    assert "seccomp" in error["error"]["details"]["missing_layers"]
    assert registry.get_status("image_info")["state"] == "IDLE"  # no plugin ran


def test_standard_isolation_warns_once_per_missing_layer(
    registry: PluginRegistry,
    payload: dict,
    make_runner: Callable[..., ToolRunner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = make_runner(disabled=["seccomp"])
    with caplog.at_level(logging.WARNING, logger="plughost.sandbox"):
        for _ in range(2):
            assert runner.run("image_info", payload)[1] == {}
    warnings = [r.getMessage() for r in caplog.records if "seccomp" in r.getMessage()]
    assert warnings == ["isolation layer seccomp is switched off; calls run without it"]


def test_unknown_layer_or_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown isolation layers: warp_drive"):
        Sandbox(disabled=["warp_drive"])
    with pytest.raises(ValueError, match="isolation must be one of"):
        Sandbox(isolation="paranoid")
