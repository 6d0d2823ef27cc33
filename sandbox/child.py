"""The sandbox child: the only place where plugin code is imported and run.

The launcher forks this process once per call and calls `main`, which never
returns. In order, before any plugin code is imported:

1. own session; stdin from /dev/null, stdout and stderr to the host's
   capture pipes; every other inherited descriptor closed;
2. (root host) private mount namespace with a tmpfs scratch directory;
3. rlimits (memory, CPU, files, file size, processes, no core);
4. (root host) drop to the call's own unprivileged uid;
5. parent-death signal, no_new_privs, scrubbed environment, cwd = scratch;
6. `{"type": "ready"}` on the reply pipe.

Any failure up to step 6 exits with `SETUP_FAILED` and no ready frame: the
plugin never runs without its limits. Then the plugin is imported, called,
and its result checked and sent as one frame.
"""

from __future__ import annotations

import errno
import importlib
import os
import resource
import signal
import sys
import traceback
from typing import Any, NoReturn

from sandbox import isolation
from sandbox.limits import CallLimits, rlimits_for
from sandbox.protocol import HEADER, READY, decode_json, encode_frame

SETUP_FAILED = 121
SAFE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
# Descriptor numbers the child keeps; the launcher hands them over in this order.
REPLY_FD, PAYLOAD_FD = 3, 4


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _setup(spec: dict[str, Any], fds: dict[str, int]) -> None:
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(fds["stdout"], 1)
    os.dup2(fds["stderr"], 2)
    os.dup2(fds["reply"], REPLY_FD)
    os.dup2(fds["payload"], PAYLOAD_FD)
    os.closerange(PAYLOAD_FD + 1, os.sysconf("SC_OPEN_MAX"))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)

    limits = CallLimits(**spec["limits"])
    uid = spec.get("uid")
    scratch = spec["scratch"]
    if uid is not None:
        scratch = isolation.enter_mount_namespace(spec["expose"], uid, limits.scratch_mb)
    for which, value in rlimits_for(limits).items():
        # Fail closed: setrlimit raises and the plugin never runs.
        resource.setrlimit(which, value)
    if uid is not None:
        isolation.drop_privileges(uid, spec["gid"])
    # After the uid change, which clears it: die with the launcher.
    isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != spec["launcher_pid"]:
        raise isolation.IsolationError("parent", "launcher exited during setup")
    isolation.prctl(isolation.PR_SET_NO_NEW_PRIVS, 1)
    os.environ.clear()
    os.environ.update(SAFE_ENV, HOME=scratch, TMPDIR=scratch)
    os.chdir(scratch)


def _read_payload() -> dict[str, Any]:
    with os.fdopen(PAYLOAD_FD, "rb") as stream:
        (length,) = HEADER.unpack(stream.read(HEADER.size))
        header = decode_json(stream.read(length))
        image = stream.read(header["image_size"])
    return {"image": image, "mime_type": header["mime_type"], "options": header["options"]}


def _error(reason: str, exc: BaseException, message: str | None = None) -> dict[str, Any]:
    text = message if message is not None else str(exc) or type(exc).__name__
    return {
        "type": "error",
        "reason": reason,
        "message": text[:2000],
        "exc_type": type(exc).__name__,
        "traceback": "".join(traceback.format_exception(exc))[-8000:],
    }


def _load(spec: dict[str, Any]) -> Any:
    module_name, _, attribute = spec["entrypoint"].partition(":")
    sys.path.insert(0, spec["plugin_dir"])
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


def _run_plugin(spec: dict[str, Any], payload: dict[str, Any]) -> bytes:
    try:
        plugin = _load(spec)
    except MemoryError as exc:
        return encode_frame(_error("memory_limit", exc, "out of memory while loading"))
    # Everything a plugin's import can raise is a load failure by definition.
    except BaseException as exc:  # noqa: BLE001
        return encode_frame(_error("load_failed", exc))
    try:
        result = plugin.run(payload)
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
    encoded = _encode_result(result, spec["limits"]["max_output_bytes"])
    return encoded if isinstance(encoded, bytes) else encode_frame(encoded)


def main(spec: dict[str, Any], fds: dict[str, int]) -> NoReturn:
    """Run one call in this (forked) process, then exit. Never returns."""
    try:
        _setup(spec, fds)
        payload = _read_payload()
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
        os._exit(SETUP_FAILED + 1)
    os._exit(0)


def describe_exit(status: int) -> dict[str, Any]:
    """Turn a raw wait status into `{"exit_code": n}` or `{"signal": "SIGSEGV"}`."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"SIG{number}"
        return {"signal": name}
    return {"exit_code": os.WEXITSTATUS(status)}


__all__ = ["SETUP_FAILED", "describe_exit", "main"]
