"""What a root launcher shares between calls (sandbox.layers.shared), attacked
the way one plugin's call would try to reach another's: running at the same
time (its unix sockets, System V message queues, its processes), or before
it in the same slot (what it left behind). Each call is in the same IPC and
UTS namespaces as the others, and in the network and PID namespaces of its
uid's slot, which no other call uses at the same time and which are cleaned
between two calls."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from host.registry import PluginRegistry
from sandbox.layers import detect
from sandbox.layers.shared import HOLDER_TITLE, Shared
from sandbox.limits import HostLimits, PluginLimits
from sandbox.protocol import ChildSpec
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner
from tests.conftest import write_plugin

AVAILABLE = detect()
SHARING = os.geteuid() == 0 and all(
    AVAILABLE.get(name) for name in ("network_namespace", "seccomp", "pid_namespace")
)
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not SHARING, reason="needs a root host with seccomp and namespaces"),
]

# One plugin, two roles: "namespaces" reports which namespaces it is in;
# "listen" waits for a message from another call; "send" tries to deliver one.
PROBE = """
import ctypes, errno, os, socket, time
options = payload['options']
role, channel = options['role'], options.get('channel')
if role == 'namespaces':
    return {name: os.readlink('/proc/self/ns/' + name) for name in ('net', 'ipc', 'uts', 'pid')}
NAME = b'\\0plughost-shared-namespace-test'
if channel == 'abstract':
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if role == 'listen':
        sock.bind(NAME)
        sock.settimeout(3)
        try:
            return {'got': sock.recv(64).decode()}
        except socket.timeout:
            return {'got': None}
    errors = []
    for _ in range(20):
        try:
            sock.sendto(b'hello', NAME)
            return {'sent': True}
        except OSError as exc:
            errors.append(exc.errno)
            time.sleep(0.1)
    return {'sent': False, 'errnos': sorted(set(errors))}
if channel == 'unix':
    if role == 'listen':  # holds an abstract and a path socket for a while
        held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
        held[0].bind(NAME)
        held[1].bind('/tmp/work/secret-path.sock')
        time.sleep(2)
        return {'held': True}
    time.sleep(0.5)
    with open('/proc/net/unix') as table:
        seen = table.read()
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.bind(NAME)
        taken = False
    except OSError as exc:
        taken = exc.errno == errno.EADDRINUSE
    return {'seen': 'shared-namespace-test' in seen or 'secret-path' in seen, 'taken': taken}
if channel == 'sysv':
    libc = ctypes.CDLL(None, use_errno=True)
    queue = libc.msgget(0x5148, 0o1666)
    return {'msgget': queue, 'errno': ctypes.get_errno()}
if channel == 'signal':
    # Every pid this call can see: its own namespace's only.
    return {'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit())}
if role == 'leave':
    # Raise the PID namespace's counter, then leave a daemon behind holding
    # an abstract and a path socket, and a socket in flight to itself.
    for _ in range(40):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            held = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            held.bind(b'\\0plughost-left-behind')
            other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            other.bind('/tmp/work/left.sock')
            a, b = socket.socketpair()
            socket.send_fds(a, [b'x'], [a.fileno(), b.fileno()])
            a.close(); b.close()
            time.sleep(60)
        os._exit(0)
    time.sleep(0.2)
    return {'left': True, 'ns': os.readlink('/proc/self/ns/net')}
if role == 'inherit':
    with open('/proc/net/unix') as table:
        sockets = table.read().splitlines()[1:]
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.bind(b'\\0plughost-left-behind')
        taken = False
    except OSError:
        taken = True
    probe.close()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ip = 0
    except OSError as exc:
        ip = exc.errno
    return {
        'me': os.getpid(), 'child': pid, 'sockets': sockets, 'taken': taken, 'ip': ip,
        'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),
        'ns': os.readlink('/proc/self/ns/net'),
    }
"""


@pytest.fixture
def runner(registry: PluginRegistry, tmp_path: Path) -> Iterator[ToolRunner]:
    write_plugin(tmp_path, "prober", PROBE)
    assert registry.load_directory(tmp_path / "prober") == ["prober"]
    sandbox = Sandbox()
    yield ToolRunner(registry, sandbox)
    sandbox.close()


def _run(runner: ToolRunner, payload: dict, plugin: str = "prober", **options: Any) -> dict:
    result, error = runner.run(plugin, {**payload, "options": options})
    assert error == {}, error
    return result


def _concurrently(*calls: Callable[[], dict]) -> list[dict]:
    results: list[dict] = [{} for _ in calls]

    def go(index: int) -> None:
        results[index] = calls[index]()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_calls_share_one_ipc_and_uts_namespace_but_not_a_network_or_pid_namespace(
    runner: ToolRunner, payload: dict
) -> None:
    first, second = _concurrently(
        lambda: _run(runner, payload, role="namespaces"),
        lambda: _run(runner, payload, role="namespaces"),
    )
    for name in ("ipc", "uts"):
        assert first[name] == second[name]  # the launcher's shared namespace
        assert first[name] != os.readlink(f"/proc/self/ns/{name}")  # not the host's
    assert first["net"] != second["net"] and first["pid"] != second["pid"]


def test_a_call_sees_none_of_another_calls_unix_sockets(runner: ToolRunner, payload: dict) -> None:
    # In a network namespace shared between calls, /proc/net/unix lists every
    # unix socket of it (abstract names and socket paths of the other calls)
    # and binding an abstract name another call holds fails with EADDRINUSE:
    # each call has a network namespace of its own.
    holder, peeker = _concurrently(
        lambda: _run(runner, payload, role="listen", channel="unix"),
        lambda: _run(runner, payload, role="peek", channel="unix"),
    )
    assert holder == {"held": True}
    assert peeker == {"seen": False, "taken": False}


def test_a_call_cannot_reach_another_through_an_abstract_unix_socket(
    runner: ToolRunner, payload: dict
) -> None:
    # Abstract socket names live in the network namespace, the call's own:
    # the name another call bound is not there (and Landlock's scope, ABI 6,
    # would refuse a peer outside the call's domain besides).
    listener, sender = _concurrently(
        lambda: _run(runner, payload, role="listen", channel="abstract"),
        lambda: _run(runner, payload, role="send", channel="abstract"),
    )
    assert listener == {"got": None}
    assert sender["sent"] is False and sender["errnos"]


def test_a_call_in_the_shared_ipc_namespace_gets_no_system_v_queue(
    runner: ToolRunner, payload: dict
) -> None:
    result = _run(runner, payload, role="send", channel="sysv")
    assert result == {"msgget": -1, "errno": errno.EPERM}


def test_a_call_sees_only_its_own_processes(runner: ToolRunner, payload: dict) -> None:
    # Its slot's PID namespace: the worker is pid 2, and the namespace's init
    # (the slot's root-owned holder) is hidden from it.
    first, second = _concurrently(
        lambda: _run(runner, payload, role="send", channel="signal"),
        lambda: _run(runner, payload, role="send", channel="signal"),
    )
    assert first["pids"] == second["pids"] == [2]


def test_nothing_a_call_leaves_in_its_slot_reaches_the_next_call(
    runner: ToolRunner, payload: dict
) -> None:
    # One call after another takes the same uid, so the same slot: the same
    # network namespace, entered again rather than made again.
    left = _run(runner, payload, role="leave")
    runner.sandbox.settle(5.0)  # the first call's uid is free again
    after = _run(runner, payload, role="inherit")
    assert left["left"] and after["ns"] == left["ns"]
    # Its daemon and the sockets it held are gone, and the PID counter starts
    # again: the next call cannot tell how many processes the last one made.
    assert after["sockets"] == [] and after["taken"] is False
    assert (after["me"], after["child"], after["pids"]) == (2, 3, [2])
    # No IP socket in a namespace the next call will use (no counter to leave).
    assert after["ip"] == errno.EAFNOSUPPORT


def test_a_slot_that_cannot_be_cleaned_is_not_reused(tmp_path: Path) -> None:
    # A socket of the slot's network namespace held outside its PID
    # namespace outlives every kill: the holder must say the slot is not clean.
    script = """
import os, socket
from sandbox.layers.shared import CLONE_NEWNET, Shared, setns
shared = Shared()
slot = shared.slot_for(1600999)
os.write(slot.control, b"c")
clean = os.read(slot.answer, 1)
own = os.open("/proc/self/ns/net", os.O_RDONLY)
setns(slot.net_ns, CLONE_NEWNET)
held = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
setns(own, CLONE_NEWNET)
os.write(slot.control, b"c")
print(clean.decode(), os.read(slot.answer, 1).decode())
shared.retire(slot)
os.waitpid(slot.holder, 0)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.split() == ["1", "0"]


def test_without_seccomp_a_call_gets_namespaces_of_its_own(
    registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    # The sharing depends on the filter that makes it safe: a sandbox with
    # seccomp switched off gives each call its own IPC namespace.
    write_plugin(tmp_path, "prober", PROBE)
    registry.load_directory(tmp_path / "prober")
    sandbox = Sandbox(disabled=["seccomp"])
    try:
        loose = ToolRunner(registry, sandbox)
        first, second = _concurrently(
            lambda: _run(loose, payload, role="namespaces"),
            lambda: _run(loose, payload, role="namespaces"),
        )
        assert first["ipc"] != second["ipc"]
        result = _run(loose, payload, role="send", channel="sysv")
        assert result["msgget"] >= 0  # the call's own namespace: its queue, no one else's
    finally:
        sandbox.close()


def test_the_launchers_policy_shares_only_what_the_layers_make_safe() -> None:
    shared = Shared()
    try:
        every = {
            name: True
            for name in (
                "network_namespace",
                "ipc_namespace",
                "uts_namespace",
                "pid_namespace",
                "seccomp",
                "landlock",
            )
        }
        assert shared.given(every, uid=1600000) == ("ipc", "uts", "pid")
        spec = ChildSpec(
            plugin_dir=str(Path(__file__).parent),
            entrypoint="x:y",
            limits=HostLimits().clamp(PluginLimits()),
            layers={**every, "mount_namespace": True},
            expose=(str(Path(__file__).parent),),
            scratch=None,
            uid=1600000,
            gid=1600000,
            cgroup_procs=(),
            warm=False,
            token="t",
        )
        given, root, slot = shared.give(spec)
        assert given == ("ipc", "uts", "slot", "mnt") and root >= 0 and slot is not None
        # Until its holder has cleaned up after that call, the slot is not given again.
        assert shared.give(spec)[0] == ("ipc", "uts", "pid", "mnt")
        # Without the filter that keeps IP sockets out of it, no slot.
        spec = dataclasses.replace(spec, layers={**spec.layers, "seccomp": False})
        given, root, slot = shared.give(spec)
        assert given == ("uts", "pid", "mnt") and slot is None
        assert shared.given(every, uid=None) == ()  # an unprivileged host's call
        assert shared.given({**every, "seccomp": False}, uid=1600000) == ("uts", "pid")
    finally:
        for made in list(shared.slots.values()):
            shared.retire(made)
            os.waitpid(made.holder, 0)
        shared.close()


def test_a_replaced_plugin_directory_gets_a_new_root(
    registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    # The launcher keeps each plugin's minimal root in a template it copies per
    # call; the template binds the plugin directory as it was. A directory
    # replaced under the same path must be what the next call runs.
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    plugins.chmod(0o755)
    write_plugin(plugins, "versioned", "return {'version': 1}")
    assert registry.load_directory(plugins / "versioned") == ["versioned"]
    sandbox = Sandbox()
    try:
        runner = ToolRunner(registry, sandbox)
        assert _run(runner, payload, plugin="versioned") == {"version": 1}
        old = plugins / "versioned"
        old.rename(plugins / "versioned.old")
        write_plugin(plugins, "versioned", "return {'version': 2}")
        assert _run(runner, payload, plugin="versioned") == {"version": 2}
    finally:
        sandbox.close()


def test_a_slot_whose_holder_was_killed_is_replaced(runner: ToolRunner, payload: dict) -> None:
    # A holder killed from outside (the OOM killer, an operator) takes its
    # namespaces with it: the uid's next calls run, in a new slot.
    first = _run(runner, payload, role="namespaces")
    runner.sandbox.settle(5.0)
    launcher = runner.sandbox.launcher.pid
    holders = [
        p for p in psutil.Process(launcher).children() if p.cmdline()[:1] == [HOLDER_TITLE.decode()]
    ]
    assert holders
    for holder in holders:
        holder.kill()
    psutil.wait_procs(holders, timeout=5)
    # The launcher may fork the next call before it has reaped the holder:
    # the dead namespace takes no process, and the call gets its own.
    second = _run(runner, payload, role="namespaces")
    runner.sandbox.settle(5.0)
    third = _run(runner, payload, role="namespaces")
    assert first["net"] not in (second["net"], third["net"])
    assert runner.sandbox.launcher.pid == launcher  # the same launcher served them


def test_where_a_holder_cannot_start_calls_get_namespaces_of_their_own() -> None:
    # A kernel without ns_last_pid, a read-only /proc/sys, or no network
    # namespace for the holder: no slot, and no second attempt per call.
    script = """
import os
from sandbox.layers import shared
from sandbox.layers.kernel import IsolationError
made = shared.unshare
def refuse_net(flags):
    if flags & shared.CLONE_NEWNET:
        raise IsolationError("net", "refused")
    made(flags)
shared.unshare = refuse_net
box = shared.Shared()
forks = []
real_fork = os.fork
def counted():
    forks.append(1)
    return real_fork()
os.fork = counted
print(box.slot_for(1600998), box.slot_for(1600997), len(forks), box.slots_work)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.split() == ["None", "None", "1", "False"]
