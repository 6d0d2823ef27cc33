"""Each hardening layer, attacked with it on and with it switched off: the
attack fails with the layer, and succeeds (or is reported) without it."""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from host.registry import PluginRegistry
from sandbox.layers import detect
from sandbox.layers.seccomp import (
    ALLOWED_SOCKET_FAMILIES,
    AUDIT_ARCH_X86_64,
    BPF_JEQ_K,
    BPF_JGE_K,
    BPF_JSET_K,
    BPF_LD_W_ABS,
    BPF_RET_K,
    DENIED_FCNTL_COMMANDS,
    DENIED_SHARED_FILES_X86_64,
    DENIED_SHARED_IPC_X86_64,
    DENIED_SOCKET_FAMILIES,
    DENIED_X86_64,
    EAFNOSUPPORT,
    ENOSYS,
    EPERM,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_KILL_PROCESS,
    SYS_CLONE3_X86_64,
    SYS_CLONE_X86_64,
    SYS_FCNTL_X86_64,
    SYS_SOCKET_X86_64,
    SYS_SOCKETPAIR_X86_64,
    seccomp_program,
)
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner
from tests.conftest import write_plugin

AVAILABLE = detect()


def needs(*layers: str) -> pytest.MarkDecorator:
    missing = [layer for layer in layers if not AVAILABLE.get(layer)]
    return pytest.mark.skipif(bool(missing), reason=f"this machine lacks {', '.join(missing)}")


@pytest.fixture
def make_runner(registry: PluginRegistry) -> Iterator[Callable[..., ToolRunner]]:
    sandboxes: list[Sandbox] = []

    def make(**kwargs: object) -> ToolRunner:
        sandbox = Sandbox(**kwargs)  # type: ignore[arg-type]
        sandboxes.append(sandbox)
        return ToolRunner(registry, sandbox)

    yield make
    for sandbox in sandboxes:
        sandbox.close()  # its calls put away (cgroups removed) before the leak check


@pytest.fixture
def listener() -> Iterator[tuple[int, Callable[[], int]]]:
    """A server on the host's loopback and a count of the connections it took.

    The kernel queues a connection once the client's connect() returns, so
    draining the accept queue after a call counts every connection the call
    made, with no thread racing the assertion.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    taken = 0

    def connections() -> int:
        nonlocal taken
        while True:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                return taken
            conn.close()
            taken += 1

    yield int(sock.getsockname()[1]), connections
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
    listener: tuple[int, Callable[[], int]],
    make_runner: Callable[..., ToolRunner],
) -> None:
    port, connections = listener
    _add(registry, tmp_path, "connector", CONNECT)
    payload = {**payload, "options": {"port": port}}
    result, error = make_runner().run("connector", payload)
    assert result == {} and error["error"]["details"]["reason"] == "plugin_raised"
    assert connections() == 0
    # The same plugin with the network layers off reaches the server: the layers did it.
    loose = make_runner(disabled=["network_namespace", "landlock"])
    assert loose.sandbox.protections()["network_namespace"] is False
    result, error = loose.run("connector", payload)
    assert error == {} and result == {"connected": True} and connections() == 1


@needs("network_namespace")
def test_plugin_sees_only_loopback(
    runner: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    # /proc/net/dev lists the interfaces of the reader's network namespace
    # (netlink, which if_nameindex() needs, is refused by the seccomp filter).
    body = """
with open('/proc/net/dev') as dev:
    rows = dev.read().splitlines()[2:]
return {'ifaces': [row.split(':')[0].strip() for row in rows]}
"""
    _add(registry, tmp_path, "ifaces", body)
    result, error = runner.run("ifaces", payload)
    assert error == {} and result == {"ifaces": ["lo"]}


@needs("landlock")
def test_landlock_denies_what_the_minimal_root_leaves_readable(
    runner: ToolRunner,
    registry: PluginRegistry,
    tmp_path: Path,
    payload: dict,
    make_runner: Callable[..., ToolRunner],
) -> None:
    # The minimal root holds no host file; Landlock still stands behind it:
    # the root directory itself is not among the paths a plugin may read.
    _add(registry, tmp_path, "lister", "return {'root': sorted(os.listdir('/'))}")
    result, error = runner.run("lister", payload)
    assert result == {} and error["error"]["details"]["exception"] == "PermissionError"
    result, error = make_runner(disabled=["landlock"]).run("lister", payload)
    assert error == {} and {"usr", "tmp", "proc", "dev"} <= set(result["root"])
    assert not {"run", "var", "home", "boot", "srv"} & set(result["root"])


# Each attack sets `errno` (0 when the call went through). With the filter it
# fails with the errno given; without it, it either succeeds or fails for
# another reason (AF_PACKET: EPERM, the call's uid has no CAP_NET_RAW).
LIBC = "import ctypes, fcntl, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
SHARED = "open(os.__file__, 'rb')"
SECCOMP_ATTACKS = {
    "ptrace": ("errno = ctypes.get_errno() if libc.ptrace(0, 0, 0, 0) else 0", EPERM),
    "vsock_listen": (
        "s = socket.socket(40, socket.SOCK_STREAM)\n"
        "s.bind((0xFFFFFFFF, 0xFFFFFFFF))\ns.listen(1)\nerrno = 0",
        EAFNOSUPPORT,
    ),
    "netlink_uevent": (
        "socket.socket(16, socket.SOCK_DGRAM, 15).bind((0, 1))\nerrno = 0",
        EAFNOSUPPORT,
    ),
    "packet_socket": ("socket.socket(17, socket.SOCK_RAW, 768)\nerrno = 0", EAFNOSUPPORT),
    "netlink_socketpair": ("socket.socketpair(16, socket.SOCK_DGRAM)\nerrno = 0", EAFNOSUPPORT),
    "modify_ldt": (
        "buf = ctypes.create_string_buffer(64)\n"
        "errno = ctypes.get_errno() if libc.syscall(154, 0, buf, 64) < 0 else 0",
        EPERM,
    ),
    "inotify_init1": ("errno = ctypes.get_errno() if libc.inotify_init1(0) < 0 else 0", EPERM),
    "flock_shared_file": (
        f"fcntl.flock({SHARED}, fcntl.LOCK_SH | fcntl.LOCK_NB)\nerrno = 0",
        EPERM,
    ),
    "record_lock_shared_file": (
        f"fcntl.lockf({SHARED}, fcntl.LOCK_SH | fcntl.LOCK_NB)\nerrno = 0",
        EPERM,
    ),
    "dnotify_shared_dir": (
        "fd = os.open(os.path.dirname(os.__file__), os.O_RDONLY)\n"
        "fcntl.fcntl(fd, fcntl.F_NOTIFY, fcntl.DN_ACCESS)\nerrno = 0",
        EPERM,
    ),
}


@needs("seccomp")
@pytest.mark.parametrize("attack", SECCOMP_ATTACKS)
def test_seccomp_denies_what_a_plugin_never_needs(
    attack: str,
    runner: ToolRunner,
    registry: PluginRegistry,
    tmp_path: Path,
    payload: dict,
    make_runner: Callable[..., ToolRunner],
) -> None:
    code, denied_with = SECCOMP_ATTACKS[attack]
    attempt = "\n".join("    " + line for line in code.splitlines())
    body = (
        f"{LIBC}try:\n{attempt}\nexcept OSError as exc:\n    errno = exc.errno\n"
        "return {'errno': errno}"
    )
    _add(registry, tmp_path, "attacker", body)
    result, error = runner.run("attacker", payload)
    assert error == {} and result == {"errno": denied_with}
    result, error = make_runner(disabled=["seccomp"]).run("attacker", payload)
    assert error == {} and result["errno"] != denied_with  # the filter did it


def _evaluate(
    program: bytes, nr: int, args: tuple[int, ...] = (), arch: int = AUDIT_ARCH_X86_64
) -> int:
    """Run the classic BPF `program` on one seccomp_data; return the action.

    Only the instructions the filter uses are implemented, so a filter that
    starts using another one fails here rather than passing by accident.
    """
    return _run_filter(program, nr, args, arch)[0]


def _run_filter(
    program: bytes, nr: int, args: tuple[int, ...] = (), arch: int = AUDIT_ARCH_X86_64
) -> tuple[int, int]:
    """`_evaluate`'s action, and how many instructions it took to reach it."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *(list(args) + [0] * 6)[:6])
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    pc, acc, steps = 0, 0, 0
    while True:
        steps += 1
        code, jt, jf, k = insns[pc]
        if code == BPF_LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == BPF_RET_K:
            return k, steps
        elif code in (BPF_JEQ_K, BPF_JGE_K, BPF_JSET_K):
            taken = {BPF_JEQ_K: acc == k, BPF_JGE_K: acc >= k, BPF_JSET_K: bool(acc & k)}[code]
            pc += 1 + (jt if taken else jf)
        else:
            raise AssertionError(f"instruction {code:#x} not understood")


def test_seccomp_program_allows_only_unix_and_ip_sockets() -> None:
    program = seccomp_program()
    allowed = sorted(ALLOWED_SOCKET_FAMILIES)
    assert allowed == [socket.AF_UNIX, socket.AF_INET, socket.AF_INET6]
    # The reasons cover every family of the kernel's AF_MAX, and no allowed one.
    assert sorted(DENIED_SOCKET_FAMILIES) == [f for f in range(46) if f not in allowed]
    for call in (SYS_SOCKET_X86_64, SYS_SOCKETPAIR_X86_64):
        for family in range(300):
            for high in (0, 1 << 32):  # the kernel reads an int: upper bits do not matter
                action = _evaluate(program, call, (family | high, socket.SOCK_STREAM, 0))
                expected = (
                    SECCOMP_RET_ALLOW if family in allowed else SECCOMP_RET_ERRNO | EAFNOSUPPORT
                )
                assert action == expected, (call, family)


def test_seccomp_program_tables() -> None:
    program = seccomp_program()
    for number in [*DENIED_X86_64, *DENIED_SHARED_FILES_X86_64]:
        assert _evaluate(program, number) == SECCOMP_RET_ERRNO | EPERM, number
    for command in DENIED_FCNTL_COMMANDS:
        assert _evaluate(program, SYS_FCNTL_X86_64, (3, command)) == SECCOMP_RET_ERRNO | EPERM
    for command in (0, 1, 2, 3, 4, 1030):  # F_DUPFD .. F_SETFL, F_DUPFD_CLOEXEC
        assert _evaluate(program, SYS_FCNTL_X86_64, (3, command)) == SECCOMP_RET_ALLOW
    assert _evaluate(program, SYS_CLONE_X86_64, (0x10000000,)) == SECCOMP_RET_ERRNO | EPERM
    assert _evaluate(program, SYS_CLONE_X86_64, (0x3D0F00,)) == SECCOMP_RET_ALLOW  # a thread
    assert _evaluate(program, 0) == SECCOMP_RET_ALLOW  # read
    assert _evaluate(program, 0x40000000) == SECCOMP_RET_KILL_PROCESS  # x32
    assert _evaluate(program, 0, arch=0x40000003) == SECCOMP_RET_KILL_PROCESS  # i386


@needs("pid_namespace")
def test_plugin_sees_no_host_process(
    runner: ToolRunner,
    registry: PluginRegistry,
    tmp_path: Path,
    payload: dict,
    make_runner: Callable[..., ToolRunner],
) -> None:
    body = (
        "return {'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),"
        " 'me': os.getpid()}"
    )
    _add(registry, tmp_path, "ps", body)
    result, error = runner.run("ps", payload)
    assert error == {}
    # Itself, and its namespace's init where that is the call's own (in its
    # uid's slot the init is the slot's holder, hidden from the call).
    assert result["me"] in result["pids"] and set(result["pids"]) <= {1, result["me"]}
    result, error = make_runner(disabled=["pid_namespace"]).run("ps", payload)
    assert error == {} and os.getpid() in result["pids"]


@needs("cgroup_memory", "cgroup_pids")
def test_a_call_runs_in_its_uids_cgroups_left_empty_and_removed_with_the_host(
    make_runner: Callable[..., ToolRunner], registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    body = "return {'cgroups': open('/proc/self/cgroup').read()}"
    _add(registry, tmp_path, "cg", body)
    runner = make_runner()
    found = []
    for _ in range(2):  # the same (lowest free) uid, once the first is put away
        runner.sandbox.settle()
        result, error = runner.run("cg", payload)
        assert error == {}
        lines = {line.split(":")[1]: line.split(":")[2] for line in result["cgroups"].splitlines()}
        assert "/plughost/call-" in lines["memory"] and "/plughost/call-" in lines["pids"]
        found.append(lines["memory"].rsplit("/", 1)[1])
    runner.sandbox.settle()  # put away right after the call returns
    assert found[0] == found[1]
    dirs = [Path(f"/sys/fs/cgroup/{c}/plughost") / found[0] for c in ("memory", "pids")]
    assert sorted(runner.sandbox.kept_cgroups()) == sorted(dirs)
    assert all((path / "cgroup.procs").read_text() == "" for path in dirs)
    runner.sandbox.close()
    assert not any(path.exists() for path in dirs)


@needs("cgroup_memory")
def test_memory_written_to_the_scratch_tmpfs_counts_against_the_limit(
    runner: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict
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
    result, error = runner.run("tmpfs_hog", payload)
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


def test_seccomp_refuses_an_architecture_it_has_no_numbers_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The filter's numbers are x86_64's: elsewhere the layer is missing (so
    `strict` refuses to run plugins) and applying it fails, never silently
    installs a filter that denies the wrong system calls."""
    import platform

    from sandbox.layers import seccomp
    from sandbox.layers.kernel import IsolationError

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert seccomp.seccomp_supported() is False
    assert seccomp.probe() is False
    with pytest.raises(IsolationError, match="no filter for aarch64"):
        seccomp.apply_seccomp()


def test_seccomp_program_for_a_shared_ipc_namespace_refuses_ipc() -> None:
    shared = seccomp_program(ipc=False)
    own = seccomp_program()
    for number in DENIED_SHARED_IPC_X86_64:
        assert _evaluate(shared, number) == SECCOMP_RET_ERRNO | EPERM, number
        assert _evaluate(own, number) == SECCOMP_RET_ALLOW, number
    for family in ALLOWED_SOCKET_FAMILIES:  # sockets as in the call's own filter
        opened = _evaluate(shared, SYS_SOCKET_X86_64, (family, socket.SOCK_DGRAM, 0))
        assert opened == SECCOMP_RET_ALLOW
    for number in [*DENIED_X86_64, *DENIED_SHARED_FILES_X86_64]:  # the rest is the same
        assert _evaluate(shared, number) == SECCOMP_RET_ERRNO | EPERM, number
    assert _evaluate(shared, 0) == SECCOMP_RET_ALLOW


def test_seccomp_program_for_a_slot_opens_only_unix_sockets() -> None:
    # A call in its uid's slot shares the network namespace with the calls
    # before and after it: an IP socket could leave state there.
    slot = seccomp_program(ipc=False, ip=False)
    for call in (SYS_SOCKET_X86_64, SYS_SOCKETPAIR_X86_64):
        for family in range(64):
            action = _evaluate(slot, call, (family, socket.SOCK_DGRAM, 0))
            if family == socket.AF_UNIX:
                assert action == SECCOMP_RET_ALLOW
            else:
                assert action == SECCOMP_RET_ERRNO | EAFNOSUPPORT, family
    for number in DENIED_SHARED_IPC_X86_64:  # the rest is the shared IPC variant's
        assert _evaluate(slot, number) == SECCOMP_RET_ERRNO | EPERM, number


def test_the_seccomp_filter_finds_every_system_call_in_a_few_steps() -> None:
    # The kernel runs the filter for each system call it cannot answer from
    # its cache, and once per system call number when a child installs it:
    # a binary search, not a chain of comparisons.
    for ipc, ip in ((True, True), (False, True), (False, False)):
        program = seccomp_program(ipc=ipc, ip=ip)
        denied = {*DENIED_X86_64, *DENIED_SHARED_FILES_X86_64}
        if not ipc:
            denied |= set(DENIED_SHARED_IPC_X86_64)
        apart = {SYS_CLONE_X86_64, SYS_SOCKET_X86_64, SYS_SOCKETPAIR_X86_64, SYS_FCNTL_X86_64}
        longest = 0
        for number in range(512):
            action, steps = _run_filter(program, number, (3, 0))
            if number not in apart:  # those read an argument after the search
                longest = max(longest, steps)
            if number in denied:
                assert action == SECCOMP_RET_ERRNO | EPERM, number
            elif number == SYS_CLONE3_X86_64:
                assert action == SECCOMP_RET_ERRNO | ENOSYS
            elif number not in apart:
                assert action == SECCOMP_RET_ALLOW, number
        # The chain of comparisons this replaced took up to 79.
        assert longest <= 14, longest
