"""The sandbox child: the only place where plugin code is imported and run.

Runs in the child: the launcher forks this process once per call and calls
`main`, which never returns. Before any plugin code is imported, it applies
`STEPS` in order, one line each (as nsjail's contain.cc does), each step
taken from the layer module that owns it (`sandbox.layers`):

    descriptors     own session; stdin /dev/null, stdout/stderr to the capture
                    pipes, every other descriptor closed; argv wiped
    cgroup          join the call's cgroups, before anything else runs
    user            (unprivileged host) a user namespace of its own
    mnt             one unshare: mount, network, IPC, UTS, PID namespaces
                    (those a root launcher did not give it: sandbox.layers.shared);
                    the minimal root with a tmpfs scratch
    net             loopback up (of its own network namespace)
    pid             relay -> init (pid 1) -> worker, or init (pid 1) -> worker
                    in the launcher's PID namespace, or /proc of its uid's
                    slot (the child is the worker); or enter the minimal root
    rlimits         memory, CPU, files, file size, processes, no core
    privilege       the call's own uid (root host), or no capabilities left
    parent          die with the parent; the parent must still be there
    no_new_privs    PR_SET_NO_NEW_PRIVS
    environment     SAFE_ENV, HOME and TMPDIR = scratch, the thread pools'
                    variables (cpus), cwd = scratch
    cpus            the call's CPUs: affinity, os.cpu_count(), thread variables
    landlock        file system (and TCP, and signal-scope) rules
    seccomp         the system-call filter

then (a cold child: after reading its payload) `{"type": "ready"}` on the
reply pipe. Any failure up to there exits with `SETUP_FAILED` and no ready
frame: the plugin never runs without its limits, and a plugin can never make
its own failure look like the sandbox's. Then the plugin is imported (a warm
child with a uid of its own imports it before its payload, and waits stopped
by the host), called, and its result
checked and sent as one frame. The child's instructions are a `ChildSpec`
and its payload a sealed memfd (`sandbox.protocol`).

What the launcher worked out once for every child (the rlimits of the
call's limits, the environment of a minimal root's scratch, which loaded
modules to forget, the import path's finders, ...) is in `sandbox.inherited`,
read here by identity; this module holds only what runs in the child.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal.signal without its enum wrapper
import errno
import gc
import importlib
import json
import math
import os
import resource
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from sandbox import inherited, trace
from sandbox.host_paths import HostPaths
from sandbox.layers import (
    UNSHARE_FLAGS,
    cgroup,
    landlock,
    mnt,
    net,
    pid,
    privilege,
    seccomp,
    shared,
    user,
)
from sandbox.layers.kernel import (
    PR_SET_PDEATHSIG,
    IsolationError,
    prctl,
    set_command_line,
)
from sandbox.limits import rlimits_for
from sandbox.protocol import (
    REPLY_OUT_OF_MEMORY,
    SETUP_FAILED,
    ChildSpec,
    Payload,
    encode_frame,
    read_payload,
)

# The launcher's handlers, given back to the default before any plugin code runs.
_DEFAULT_SIGNALS = tuple(map(int, (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE)))

# Descriptor numbers the child keeps; the launcher hands them over in this order.
# RELAY_FD is the relay's alone: it reports the worker's wait status there.
REPLY_FD, PAYLOAD_FD, RELAY_FD, ROOT_FD = 3, 4, 5, 6


@dataclass
class Setup:
    """The child's state while its steps run."""

    spec: ChildSpec
    fds: dict[str, int]
    scratch: str
    user_namespace: bool  # an unprivileged host's calls: a user namespace
    isolated: bool  # a per-call uid or a user namespace: namespaces and minimal root
    pid_namespace: bool
    slot: bool  # forked into its uid's PID and network namespaces (sandbox.layers.shared)

    @classmethod
    def of(cls, spec: ChildSpec, fds: dict[str, int]) -> Setup:
        # A root host gives the call its own host uid; an unprivileged one, a user
        # namespace. Either way the call gets the same namespaces and minimal root.
        user_namespace = spec.uid is None and spec.layers.get("user_namespace", False)
        isolated = spec.uid is not None or user_namespace
        pid_namespace = isolated and spec.layers.get("pid_namespace", False)
        slot = "slot" in spec.given
        return cls(spec, fds, spec.scratch or "", user_namespace, isolated, pid_namespace, slot)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _descriptors(setup: Setup) -> None:
    os.setsid()
    fds = setup.fds
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(fds["stdout"], 1)
    os.dup2(fds["stderr"], 2)
    os.dup2(fds["reply"], REPLY_FD)
    os.dup2(fds["payload"], PAYLOAD_FD)
    os.dup2(fds["relay"], RELAY_FD)
    last = RELAY_FD
    if "root" in fds:  # the launcher's template of the minimal root (step mnt)
        os.dup2(fds["root"], ROOT_FD)
        last = ROOT_FD
    keep = trace.fd()  # -1 unless a measurement traces the call
    if keep > last:
        os.closerange(last + 1, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    else:
        os.closerange(last + 1, os.sysconf("SC_OPEN_MAX"))
    _wipe_command_line()
    for sig in _DEFAULT_SIGNALS:
        # The C function: `signal.signal` converts to and from enums in Python.
        _signal.signal(sig, _signal.SIG_DFL)
    _signal.set_wakeup_fd(-1)


def _cgroup(setup: Setup) -> None:
    cgroup.join(setup.spec.cgroup_procs)


def _user(setup: Setup) -> None:
    if setup.user_namespace:
        user.enter_user_namespace(os.getuid(), os.getgid())


def _mnt(setup: Setup) -> None:
    if not setup.isolated:
        return
    spec = setup.spec
    flags = 0
    for name, flag in UNSHARE_FLAGS.items():
        if spec.layers.get(name):
            flags |= flag
    flags &= ~shared.flags_of(spec.given)  # the launcher made those
    if spec.uid is not None:
        owner, group = spec.uid, spec.gid if spec.gid is not None else spec.uid
    else:
        owner, group = os.getuid(), os.getgid()
    if "mnt" in spec.given:  # a copy of the launcher's template of this root
        shared.setns(ROOT_FD, mnt.CLONE_NEWNS)
        os.close(ROOT_FD)
        mnt.enter_root_copy(owner, group, _tmpfs_sizes(spec), flags)
        return
    mnt.build_minimal_root(spec.expose, owner, group, _tmpfs_sizes(spec), flags, spec.hide)


def _tmpfs_sizes(spec: ChildSpec) -> tuple[int, int]:
    """MB of the call's scratch and of its /dev/shm (its memory limit: pages
    there are memory, counted by the call's memory cgroup where it has one)."""
    return spec.limits.scratch_mb, spec.limits.memory_mb


def _net(setup: Setup) -> None:
    if setup.isolated and setup.spec.layers.get("network_namespace") and not setup.slot:
        net.loopback_up()


def _pid(setup: Setup) -> None:
    if setup.slot:  # a process of its slot's PID namespace, in a copied root
        mnt.mount_own_proc(hide_others=True)
        setup.scratch = mnt.SCRATCH
    elif setup.pid_namespace:
        call_fds = (1, 2, REPLY_FD, PAYLOAD_FD)
        given = setup.spec.given
        # Returns in the worker.
        pid.split(
            setup.spec.uid, setup.spec.gid, RELAY_FD, call_fds, "pid" in given, "mnt" in given
        )
        setup.scratch = mnt.SCRATCH
    elif setup.isolated:
        setup.scratch = mnt.enter_minimal_root(own_pid_namespace=False)
    os.close(RELAY_FD)  # only a relay reports through it; the plugin never holds it


def _rlimits(setup: Setup) -> None:
    extra = 1 if setup.pid_namespace and not setup.slot else 0  # init has the call's uid
    limits = setup.spec.limits
    counted = setup.spec.memory_counted
    prepared, tables = inherited.RLIMITS
    values = tables[extra, counted] if prepared is limits else rlimits_for(limits, extra, counted)
    for which, value in values.items():
        # Fail closed: setrlimit raises and the plugin never runs.
        resource.setrlimit(which, value)


def _privilege(setup: Setup) -> None:
    privilege.give_up_privileges(setup.spec.uid, setup.spec.gid, setup.user_namespace)


def _parent(setup: Setup) -> None:
    # After the uid change, which clears it: die with the parent.
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if setup.slot:
        expected_parent = 0  # the launcher, outside the slot's PID namespace
    elif setup.pid_namespace:
        expected_parent = 1
    else:
        expected_parent = setup.spec.launcher_pid
    if os.getppid() != expected_parent:
        raise IsolationError("parent", "parent exited during setup")


def _no_new_privs(setup: Setup) -> None:
    privilege.no_new_privs()


def _environment(setup: Setup) -> None:
    threads = inherited.thread_count(setup.spec.limits.cpus)
    key, _, prepared = inherited.ENVIRONMENT
    if key != (setup.scratch, threads):
        prepared = inherited.environment_for(setup.scratch, threads)
    inherited.apply_environment(prepared)
    os.chdir(setup.scratch)
    if setup.isolated:
        # The host's venv (its bin/python) is not in the minimal root; the
        # interpreter it leads to is (sys.base_prefix): what multiprocessing
        # runs for its resource tracker and its "spawn" start method.
        sys.executable = sys._base_executable = inherited.INTERPRETER  # type: ignore[attr-defined]


# What thread pools read to size themselves (set by the environment step).
THREAD_VARIABLES = inherited.THREAD_VARIABLES


def _cpus(setup: Setup) -> None:
    """Run on `limits.cpus` of the CPUs this process may use (a window at a
    random place, so concurrent calls spread over the machine), and have
    thread pools sized for them: os.cpu_count(), which multiprocessing and
    concurrent.futures read (the variables of THREAD_VARIABLES, which the
    environment step set, say as much). Sizing, not a bound: a call may
    widen its own affinity again, within what the host may use."""
    allowed = sorted(os.sched_getaffinity(0))
    count = min(setup.spec.limits.cpus, len(allowed))
    start = int.from_bytes(os.urandom(2), "little") % len(allowed)
    os.sched_setaffinity(0, {allowed[(start + i) % len(allowed)] for i in range(count)})
    os.cpu_count = lambda: count


def _landlock(setup: Setup) -> None:
    if setup.spec.layers.get("landlock"):
        landlock.apply(inherited.landlock_expose(setup.spec), inherited.writable(setup.scratch))


def _seccomp(setup: Setup) -> None:
    if setup.spec.layers.get("seccomp"):
        given = setup.spec.given
        seccomp.apply_seccomp(
            ipc="ipc" not in given, ip="slot" not in given, counted=setup.spec.memory_counted
        )


# The child's setup, in order; each step applies one layer (or skips it when
# the call does not get that layer).
STEPS: tuple[tuple[str, Callable[[Setup], None]], ...] = (
    ("descriptors", _descriptors),
    ("cgroup", _cgroup),
    ("user", _user),
    ("mnt", _mnt),
    ("net", _net),
    ("pid", _pid),
    ("rlimits", _rlimits),
    ("privilege", _privilege),
    ("parent", _parent),
    ("no_new_privs", _no_new_privs),
    ("environment", _environment),
    ("cpus", _cpus),
    ("landlock", _landlock),
    ("seccomp", _seccomp),
)


def _wipe_command_line() -> None:
    """Blank this process's argv memory, which /proc/<pid>/cmdline shows.

    The launcher's command line names the host's source directory; every
    process of the call is a fork of it, and the plugin can read its own
    and (without a PID namespace) its parent's. A fork has the launcher's
    addresses, so where that memory is was read there once (`sandbox.inherited.prepare`).
    """
    set_command_line(b"", inherited.ARGV)


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
    """The error frame of `exc`: its traceback shows the plugin's frames
    (relative to its directory) and the standard library's, never the
    sandbox's own code or a host path (`sandbox.host_paths`)."""
    text = message if message is not None else str(exc) or type(exc).__name__
    spec = _CALL
    packages = (*spec.import_paths, spec.import_root or "") if spec is not None else ()
    paths = HostPaths(spec.plugin_dir if spec is not None else "", packages)
    return {
        "type": "error",
        "reason": reason,
        # Filtered, then cut: a path cut in two would no longer be recognised.
        "message": paths.scrub(text[:8000])[:2000],
        "exc_type": type(exc).__name__,
        "traceback": paths.scrub("".join(traceback.format_exception(exc))[-8000:]),
    }


_CALL: ChildSpec | None = None  # the call's, set before plugin code runs


# What the child forgot of the launcher's imports, kept referenced (`_isolate_imports`).
_FORGOTTEN: list[object] = []


def _names_to_forget() -> list[str]:
    """The loaded modules that are not the standard library's: as
    `sandbox.inherited.prepare` found them in the launcher when the set of
    loaded modules is the same (looking at each again would write to every
    module's page, see `_isolate_imports`), else found now."""
    # Between `prepare` and here the child's own set-up only ever adds
    # modules (a lazy import), so the same count and every name still there
    # is the same set.
    known, names = inherited.PREPARED
    if len(sys.modules) == len(known) and all(name in sys.modules for name in names):
        return list(names)
    return [name for name, module in list(sys.modules.items()) if inherited.forget(name, module)]


def _isolate_imports(spec: ChildSpec) -> None:
    """The plugin imports from its directory, its environment and the standard
    library only: the host's packages the launcher had loaded (and the import
    hooks they installed) are forgotten, and no other path is searched."""
    sys.path[:] = inherited.import_path(spec)
    sys.meta_path[:] = [finder for finder in sys.meta_path if inherited.from_stdlib(finder)]
    sys.path_hooks[:] = [hook for hook in sys.path_hooks if inherited.from_stdlib(hook)]
    # What is forgotten is kept referenced here, not freed: freeing it would
    # write to memory the child still shares with the launcher, a page copy
    # for each (most of this step's cost).
    for name in _names_to_forget():  # after the hooks: they name modules
        _FORGOTTEN.append(sys.modules.pop(name))
    _FORGOTTEN.append(sys.path_importer_cache)  # a new one, not emptied (each entry a write)
    sys.path_importer_cache = {}
    importlib.invalidate_caches()
    for entry in sys.path:  # after the invalidation, which would have them list again
        finder = inherited.FINDERS.get(entry)
        if finder is not None:
            sys.path_importer_cache[entry] = finder


def _load(spec: ChildSpec) -> Any:
    module_name, _, attribute = spec.entrypoint.partition(":")
    _isolate_imports(spec)
    trace.mark("child.isolate_imports")
    module = importlib.import_module(module_name)
    plugin = getattr(module, attribute)()
    trace.mark("child.import")
    return plugin


def _encode_result(result: Any, max_bytes: int) -> bytes | dict[str, Any]:
    if not isinstance(result, dict):
        wrong_type = TypeError(f"run() returned {type(result).__name__}, expected dict")
        return _error("invalid_output", wrong_type)
    try:
        frame = encode_frame({"type": "result", "result": result})
    except (TypeError, ValueError, RecursionError) as exc:
        # Only now is the value walked: the success path pays nothing.
        try:
            found = _not_json(result, "result")
        # The walk runs the plugin's own objects' methods (repr, hasattr):
        # whatever they raise, the encoder's message stands.
        except Exception:  # noqa: BLE001
            found = None
        text = f"result is not JSON-serialisable: {found or exc}"
        # Its own traceback would show only the json module's frames.
        return _error("invalid_output", type(exc)(text))
    if len(frame) > max_bytes:
        too_large = ValueError(f"result of {len(frame)} bytes, the limit is {max_bytes}")
        return _error("output_too_large", too_large)
    return frame


_JSON_SCALARS = (str, int, float, bool, type(None))
_MAX_WALK_DEPTH = 64
# Values the walk looks at before it gives up (the encoder's message then
# stands): a result shares objects, so its walk is bounded by steps, not size.
_MAX_WALK_STEPS = 100_000
_MAX_KEY_SHOWN = 60
_MAX_INT_BITS = 14_000  # about the 4,300 digits Python converts to text


def _advice(value: object) -> str:
    """What to return instead of `value`, which JSON cannot hold."""
    if isinstance(value, bytes | bytearray | memoryview):
        return "base64-encode it to a str (base64.b64encode(data).decode()) or make it a list"
    if isinstance(value, set | frozenset):
        return "make it a list (sorted(...))"
    if hasattr(value, "tolist"):  # numpy arrays and numbers
        return "convert it with .tolist() (an array) or .item() (a number)"
    return "convert it to a str, number, bool, None, list or dict"


def _scalar_problem(value: Any) -> str | None:
    """Why JSON cannot hold the scalar `value` (None: it can)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"is {value!r}, which JSON cannot hold: return None or a finite number"
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        return "is an int too long to write as text: return it as a str"
    return None


def _shown_key(key: str) -> str:
    """A key as the path shows it: whole, or by its length (never cut in two:
    the host recognises its paths only whole)."""
    if len(key) <= _MAX_KEY_SHOWN:
        return json.dumps(key)
    return f"<a key of {len(key)} characters>"


def _not_json(value: Any, path: str = "result") -> str | None:
    """Where in `value` (a dict the encoder refused) the first thing JSON cannot
    hold is, what it is, and what to do: `result["thumb"][0] is bytes: ...`.
    None if nothing is found within the walk's bounds (the encoder's own
    message then stands)."""
    steps = [_MAX_WALK_STEPS]
    return _walk(value, path, 0, frozenset(), steps)


def _walk(value: Any, path: str, depth: int, seen: frozenset[int], steps: list[int]) -> str | None:
    steps[0] -= 1
    if steps[0] < 0:
        return None
    if isinstance(value, _JSON_SCALARS):
        problem = _scalar_problem(value)
        return None if problem is None else f"{path} {problem}"
    if depth >= _MAX_WALK_DEPTH:
        return f"{path} is nested more than {_MAX_WALK_DEPTH} levels deep"
    if id(value) in seen:
        return f"{path} contains itself (a reference cycle)"
    inner = seen | {id(value)}
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, _JSON_SCALARS):
                return f"{path} has a key of type {type(key).__name__}: make its keys str"
            problem = _scalar_problem(key)
            if problem is not None:
                return f"{path} has a key that {problem}"
            where = _shown_key(key) if isinstance(key, str) else repr(key)
            found = _walk(item, f"{path}[{where}]", depth + 1, inner, steps)
            if found is not None or steps[0] < 0:
                return found
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _walk(item, f"{path}[{index}]", depth + 1, inner, steps)
            if found is not None or steps[0] < 0:
                return found
        return None
    cls = type(value)
    name = cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"
    return f"{path} is {name}, which JSON cannot hold: {_advice(value)}"


def _load_or_error(spec: ChildSpec) -> Any:
    """The plugin object, or the error frame that reports why it did not load."""
    try:
        return _load(spec)
    except MemoryError as exc:
        return encode_frame(_error("memory_limit", exc, "out of memory while loading"))
    # Everything a plugin's import can raise is a load failure by definition.
    except BaseException as exc:  # noqa: BLE001
        return encode_frame(_error("load_failed", exc))


def _run_plugin(spec: ChildSpec, payload: Payload, plugin: Any) -> bytes:
    if isinstance(plugin, bytes):
        return plugin  # it did not load: the error frame
    try:
        result = plugin.run(payload.as_dict())
        trace.mark("child.run")
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
        _flush_output()  # what it printed first is its author's to see
        os._exit(code)
    # The boundary of plugin code: whatever it raises becomes its error reply.
    except BaseException as exc:  # noqa: BLE001
        return encode_frame(_error("plugin_raised", exc))
    encoded = _encode_result(result, spec.limits.max_output_bytes)
    return encoded if isinstance(encoded, bytes) else encode_frame(encoded)


def _flush_output() -> None:
    """Write out what the plugin printed and Python still holds in its buffers."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        # A stream the plugin closed or replaced: its reply still goes out.
        except Exception:  # noqa: BLE001
            continue


def main(spec: ChildSpec, fds: dict[str, int]) -> NoReturn:
    """Run one call in this (forked) process, then exit. Never returns."""
    gc.disable()
    try:
        setup = Setup.of(spec, fds)
        trace.mark("child.forked")
        for name, step in STEPS:
            step(setup)
            trace.mark("child." + name)
        if not spec.warm:
            payload = read_payload(PAYLOAD_FD)
        _write_all(REPLY_FD, inherited.READY_FRAME)
        trace.mark("child.payload+ready")
    # Fail closed: any setup problem ends the child before plugin code runs.
    except BaseException as exc:  # noqa: BLE001
        try:
            os.write(2, f"sandbox setup failed: {exc!r}\n".encode()[:1000])
        finally:
            os._exit(SETUP_FAILED)
    # From here on plugin code runs: whatever ends the child now is the
    # plugin's doing. A warm child with a uid of its own imports the plugin
    # before its payload: the host then stops every process and thread of
    # the call until the hand-over (`sandbox.prewarm`). Without one there is
    # nothing to stop the call by, so no plugin code runs before the call.
    global _CALL
    _CALL = spec
    gc.enable()
    early = not spec.warm or spec.uid is not None
    try:
        plugin = _load_or_error(spec) if early else None
        if spec.warm:
            _wait_for_payload()
            payload = read_payload(PAYLOAD_FD)
        if not early:
            plugin = _load_or_error(spec)
        frame = _run_plugin(spec, payload, plugin)
        _flush_output()
        _write_all(REPLY_FD, frame)
        trace.mark("child.reply")
    except MemoryError:
        os._exit(REPLY_OUT_OF_MEMORY)
    except BaseException:  # noqa: BLE001 - never back into the launcher's code
        os._exit(1)
    os._exit(0)


__all__ = ["SETUP_FAILED", "main"]
