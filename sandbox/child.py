"""The sandbox child: the only place where plugin code is imported and run.

The launcher forks this process once per call and calls `main`, which never
returns. In order, before any plugin code is imported:

1. own session; stdin from /dev/null, stdout and stderr to the host's
   capture pipes; every other inherited descriptor closed; the host's
   command line wiped from this process's memory (so /proc shows no host
   path); the call's cgroups joined;
2. (unprivileged host) a new user namespace in which only the host's uid
   and gid exist; then (root or unprivileged) new mount, network, IPC, UTS
   and PID namespaces and a minimal root holding only the interpreter, the
   plugin's packages, the plugin and a tmpfs scratch directory
   (`isolation.build_minimal_root`, `isolation.enter_minimal_root`);
   loopback only; with a PID namespace the process splits into relay, init
   and worker (see `_split_for_pid_namespace`);
3. rlimits (memory, CPU, files, file size, processes, no core);
4. drop to the call's own unprivileged uid (root host), or give up every
   capability the user namespace lent (unprivileged host);
5. parent-death signal, no_new_privs, scrubbed environment, cwd = scratch;
6. Landlock file-system (and TCP, and signal-scope) rules, then seccomp;
7. `{"type": "ready"}` on the reply pipe.

Any failure up to step 7 exits with `SETUP_FAILED` and no ready frame: the
plugin never runs without its limits. Then the plugin is imported, called,
and its result checked and sent as one frame. The child's instructions are
a `ChildSpec` and its payload a sealed memfd (`sandbox.protocol`).
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import os
import resource
import signal
import socket
import sys
import traceback
from typing import Any, NoReturn

from sandbox import isolation
from sandbox import layers as hardening
from sandbox.limits import rlimits_for
from sandbox.protocol import (
    READY,
    RELAYED_STATUS,
    REPLY_OUT_OF_MEMORY,
    SAFE_ENV,
    SETUP_FAILED,
    ChildSpec,
    Payload,
    encode_frame,
    read_payload,
)

# Descriptor numbers the child keeps; the launcher hands them over in this order.
# RELAY_FD is the relay's alone: it reports the worker's wait status there.
REPLY_FD, PAYLOAD_FD, RELAY_FD = 3, 4, 5
STATUS = RELAYED_STATUS
# What a plugin may read besides the interpreter, its packages and itself:
# shared libraries, the loader's cache, and its own /proc and /dev entries.
SYSTEM_READ_ONLY = (
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/proc",
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/urandom",
    "/dev/random",
    "/sys/devices/system/cpu",
)
WRITABLE_FILES = ("/dev/null",)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _setup(spec: ChildSpec, fds: dict[str, int]) -> str:
    """Steps 1 to 5 of the module docstring; returns the scratch directory."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(fds["stdout"], 1)
    os.dup2(fds["stderr"], 2)
    os.dup2(fds["reply"], REPLY_FD)
    os.dup2(fds["payload"], PAYLOAD_FD)
    os.dup2(fds["relay"], RELAY_FD)
    os.closerange(RELAY_FD + 1, os.sysconf("SC_OPEN_MAX"))
    _wipe_command_line()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)

    limits = spec.limits
    layers = spec.layers
    uid = spec.uid
    scratch = spec.scratch or ""
    for procs_file in spec.cgroup_procs:
        with open(procs_file, "w") as stream:  # the call's cgroups, before anything else runs
            stream.write(str(os.getpid()))
    # A root host gives the call its own host uid; an unprivileged one, a user
    # namespace. Either way the call gets the same namespaces and minimal root.
    user_namespace = uid is None and layers.get("user_namespace", False)
    isolated = uid is not None or user_namespace
    pid_namespace = isolated and layers.get("pid_namespace", False)
    if isolated:
        if user_namespace:
            isolation.enter_user_namespace(os.getuid(), os.getgid())
        flags = 0
        for name in ("network_namespace", "ipc_namespace", "uts_namespace", "pid_namespace"):
            if layers.get(name):
                flags |= hardening.NAMESPACES[name]
        owner, group = (uid, spec.gid or uid) if uid is not None else (os.getuid(), os.getgid())
        isolation.build_minimal_root(spec.expose, owner, group, limits.scratch_mb, flags)
        if layers.get("network_namespace"):
            hardening.loopback_up()
        if pid_namespace:
            _split_for_pid_namespace(uid, spec.gid)  # returns in the worker only
            scratch = isolation.SCRATCH
        else:
            scratch = isolation.enter_minimal_root(own_pid_namespace=False)
    os.close(RELAY_FD)  # only a relay reports through it; the plugin never holds it
    for which, value in rlimits_for(limits, extra_processes=1 if pid_namespace else 0).items():
        # Fail closed: setrlimit raises and the plugin never runs.
        resource.setrlimit(which, value)
    _give_up_privileges(uid, spec.gid, user_namespace)
    # After the uid change, which clears it: die with the parent.
    isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
    expected_parent = 1 if pid_namespace else spec.launcher_pid
    if os.getppid() != expected_parent:
        raise isolation.IsolationError("parent", "parent exited during setup")
    isolation.prctl(isolation.PR_SET_NO_NEW_PRIVS, 1)
    os.environ.clear()
    os.environ.update(SAFE_ENV, HOME=scratch, TMPDIR=scratch)
    os.chdir(scratch)
    return scratch


def _give_up_privileges(uid: int | None, gid: int | None, user_namespace: bool) -> None:
    """Drop to the call's own uid (root host), or give up the capabilities a
    user namespace lent (unprivileged host)."""
    if uid is not None and gid is not None:
        isolation.drop_privileges(uid, gid)
    elif user_namespace:
        isolation.drop_capabilities()


def _split_for_pid_namespace(uid: int | None, gid: int | None) -> None:
    """Fork into the new PID namespace: relay (here) -> init (pid 1) -> worker.

    The relay stays in the host's namespace and hands the worker's exit
    status to the launcher. Init mounts the namespace's /proc and switches
    to the minimal root, then reaps every process of the namespace; when the
    worker ends, init reports and exits, and the kernel kills whatever is
    left in the namespace. Returns only in the worker.
    """
    status_r, status_w = os.pipe()
    init = os.fork()
    if init:
        os.close(status_w)
        _relay(init, status_r)
    os.close(status_r)
    isolation.enter_minimal_root(own_pid_namespace=True)
    worker = os.fork()
    if worker:
        for fd in (0, 1, 2, REPLY_FD, PAYLOAD_FD, RELAY_FD):
            os.close(fd)
        _give_up_privileges(uid, gid, user_namespace=uid is None)
        isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
        _init_loop(worker, status_w)
    os.close(status_w)


def _init_loop(worker: int, status_w: int) -> NoReturn:
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == worker:
            os.write(status_w, STATUS.pack(status))
            os._exit(0)


def _relay(init: int, status_r: int) -> NoReturn:
    """Hand the worker's wait status to the launcher, then exit.

    The relay is root and in the host's PID namespace: it never re-raises
    the plugin's fatal signal on itself (a root core dump, a root crash),
    it writes the raw status on RELAY_FD, which the launcher reports as the
    call's own.
    """
    for fd in (1, 2, REPLY_FD, PAYLOAD_FD):
        os.close(fd)  # the call's pipes belong to the worker
    isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
    data = b""
    while len(data) < STATUS.size:
        chunk = os.read(status_r, STATUS.size - len(data))
        if not chunk:
            break
        data += chunk
    _, init_status = os.waitpid(init, 0)
    status = STATUS.unpack(data)[0] if len(data) == STATUS.size else init_status
    _write_all(RELAY_FD, STATUS.pack(status))
    os._exit(0)


def _wipe_command_line() -> None:
    """Blank this process's argv memory, which /proc/<pid>/cmdline shows.

    The launcher's command line names the host's source directory; every
    process of the call is a fork of it, and the plugin can read its own
    and (without a PID namespace) its parent's.
    """
    with open("/proc/self/stat", "rb") as stream:
        stat = stream.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48 and 49
    if 0 < start < end:
        ctypes.memset(start, 0, end - start)


def _harden(spec: ChildSpec, scratch: str) -> None:
    """Landlock and seccomp, the last layers before the plugin is imported."""
    layers = spec.layers
    if layers.get("landlock"):
        read_only = [*spec.expose, *SYSTEM_READ_ONLY]
        hardening.apply_landlock(read_only, [scratch], WRITABLE_FILES)
    if layers.get("seccomp"):
        hardening.apply_seccomp()


def _wait_for_payload() -> None:
    """A warm child: block until the host hands over the payload's memfd."""
    with socket.socket(fileno=PAYLOAD_FD) as sock:
        sock.sendall(b"w")  # set up and waiting
        message, fds, _, _ = socket.recv_fds(sock, 16, 1)
    if message != b"go" or len(fds) != 1:
        os._exit(0)  # put away unused
    os.dup2(fds[0], PAYLOAD_FD)  # the socket's number, free again
    os.close(fds[0])


def _error(reason: str, exc: BaseException, message: str | None = None) -> dict[str, Any]:
    text = message if message is not None else str(exc) or type(exc).__name__
    return {
        "type": "error",
        "reason": reason,
        "message": text[:2000],
        "exc_type": type(exc).__name__,
        "traceback": "".join(traceback.format_exception(exc))[-8000:],
    }


def _load(spec: ChildSpec) -> Any:
    module_name, _, attribute = spec.entrypoint.partition(":")
    sys.path.insert(0, spec.plugin_dir)
    module = importlib.import_module(module_name)
    return getattr(module, attribute)()


def _encode_result(result: Any, max_bytes: int) -> bytes | dict[str, Any]:
    if not isinstance(result, dict):
        wrong_type = TypeError(f"run() returned {type(result).__name__}, expected dict")
        return _error("invalid_output", wrong_type)
    try:
        frame = encode_frame({"type": "result", "result": result})
    except (TypeError, ValueError, RecursionError) as exc:
        return _error("invalid_output", exc, f"result is not JSON-serialisable: {exc}"[:300])
    if len(frame) > max_bytes:
        too_large = ValueError(f"result of {len(frame)} bytes, the limit is {max_bytes}")
        return _error("output_too_large", too_large)
    return frame


def _run_plugin(spec: ChildSpec, payload: Payload) -> bytes:
    try:
        plugin = _load(spec)
    except MemoryError as exc:
        return encode_frame(_error("memory_limit", exc, "out of memory while loading"))
    # Everything a plugin's import can raise is a load failure by definition.
    except BaseException as exc:  # noqa: BLE001
        return encode_frame(_error("load_failed", exc))
    try:
        result = plugin.run(payload.as_dict())
    except MemoryError as exc:
        return encode_frame(_error("memory_limit", exc, "out of memory"))
    except OSError as exc:
        if exc.errno == errno.ENOMEM:  # mmap and friends refused by RLIMIT_AS
            return encode_frame(_error("memory_limit", exc, "out of memory"))
        return encode_frame(_error("plugin_raised", exc))
    except SystemExit as exc:
        # The plugin asked the interpreter to exit: honour it, without a reply,
        # so the host reports it as a child that died.
        code = exc.code if isinstance(exc.code, int) else 1
        os._exit(code)
    # The boundary of plugin code: whatever it raises becomes its error reply.
    except BaseException as exc:  # noqa: BLE001
        return encode_frame(_error("plugin_raised", exc))
    encoded = _encode_result(result, spec.limits.max_output_bytes)
    return encoded if isinstance(encoded, bytes) else encode_frame(encoded)


def main(spec: ChildSpec, fds: dict[str, int]) -> NoReturn:
    """Run one call in this (forked) process, then exit. Never returns."""
    try:
        scratch = _setup(spec, fds)
        _harden(spec, scratch)
        if spec.warm:
            _wait_for_payload()
        payload = read_payload(PAYLOAD_FD)
        _write_all(REPLY_FD, encode_frame(READY))
    # Fail closed: any setup problem ends the child before plugin code runs.
    except BaseException as exc:  # noqa: BLE001
        try:
            os.write(2, f"sandbox setup failed: {exc!r}\n".encode()[:1000])
        finally:
            os._exit(SETUP_FAILED)
    try:
        frame = _run_plugin(spec, payload)
        sys.stdout.flush()
        sys.stderr.flush()
        _write_all(REPLY_FD, frame)
    except MemoryError:
        os._exit(REPLY_OUT_OF_MEMORY)
    os._exit(0)


__all__ = ["SETUP_FAILED", "main"]
