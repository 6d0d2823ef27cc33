"""Running the suite: every case with benign calls before, between and after
them, listeners for the network cases to try to reach, and the server's
start-up self-check (a few probes on the server's own sandbox, on its warm
path when it prewarms children)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import struct
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from host.crashsuite import cases as corpus
from host.crashsuite.cases import Case
from host.crashsuite.claims import observed_of, run_case
from host.crashsuite.evidence import Evidence
from host.crashsuite.report import CaseReport, SuiteReport
from host.crashsuite.targets import LocalTarget, Target
from host.discovery import BUNDLED_DIR
from host.registry import PluginRegistry
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner

BENIGN_EVERY = 5
# The probes check verdicts, not time, and none of them expects a timeout:
# they get ten times their timeouts, so a slow or loaded machine (an
# emulated one runs Python 10-20x slower) fails none of them for its speed.
# A host that contains them costs no more: no probe waits out its timeout.
SELF_CHECK_TIME_SCALE = 10.0
PROBES = (
    "segfault",
    "huge_allocation",
    "fork_bomb",
    "signal_host",
    "read_root_only_file",
    "garbage_frame",
    "daemon_grandchild",
    "write_outside_scratch",
    "read_host_env_vars",
)


def sample_png(width: int = 32, height: int = 24, rgb: bytes = b"\x0a\x78\xc8") -> bytes:
    """A small one-colour PNG, written with the standard library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + rgb * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


class _Listener:
    """A server for the network cases to try to reach: TCP on the host's
    127.0.0.1, or (`unix=True`) a root-owned, world-connectable unix socket
    outside /tmp, where host services such as journald or D-Bus listen. It
    sends `nonce` to every connection: a case that reached a listener of
    its own sandbox at the same port or path cannot pass for an escape."""

    def __init__(self, nonce: str, unix: bool = False) -> None:
        self.nonce = nonce.encode()
        self._directory: str | None = None
        if unix:
            self._directory = _service_directory()
            self.path = os.path.join(self._directory, "service.sock")
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(self.path)
            os.chmod(self.path, 0o666)
        else:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.port = int(self.sock.getsockname()[1])
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            with conn, contextlib.suppress(OSError):
                conn.settimeout(0.5)
                conn.sendall(self.nonce)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)


def _service_directory() -> str:
    """A world-enterable directory where a host service would put its socket."""
    for parent in ("/run", "/var/run", str(Path.home())):
        try:
            directory = tempfile.mkdtemp(prefix="plughost-suite-", dir=parent)
        except OSError:
            continue
        os.chmod(directory, 0o755)
        return directory
    return tempfile.mkdtemp(prefix="plughost-suite-")


class _Benign:
    """The benign calls around the cases, which must keep succeeding."""

    def __init__(self, target: Target, plugin: str, image: bytes) -> None:
        self.target, self.plugin, self.image = target, plugin, image
        self.calls = 0
        self.failures: list[str] = []

    def __call__(self, where: str) -> None:
        self.calls += 1
        result, error = self.target.call(self.plugin, self.image, {})
        if error or not result:
            self.failures.append(f"{where}: {observed_of(result, error)}")


def run_suite(
    cases: list[Case],
    target: Target,
    progress: Callable[[int, int, CaseReport], None] | None = None,
    benign_plugin: str = "image_probe",
    time_scale: float = 1.0,
) -> SuiteReport:
    """Run every case with benign calls around them; never raises for a case.
    `time_scale` scales the suite's own waits; the cases' timeouts are scaled
    where they are loaded (`cases.scaled`, or a corpus a server loads)."""
    image = sample_png()
    protections = target.protections()
    nonce = secrets.token_hex(16)
    listener, unix_listener = _Listener(nonce), _Listener(nonce, unix=True)
    evidence = Evidence(_service_directory())
    benign = _Benign(target, benign_plugin, image)
    reports = []
    try:
        benign("before the suite")
        for index, case in enumerate(cases, 1):
            options = {
                "listener_port": listener.port,
                "unix_listener_path": unix_listener.path,
                "host_cwd": os.getcwd(),
                "host_sys_path": [p for p in sys.path if p][:20],
                **evidence.options_for(case.plugin.directory, nonce),
            }
            report = run_case(case, target, image, options, protections, time_scale)
            reports.append(report)
            if progress is not None:
                progress(index, len(cases), report)
            if index % BENIGN_EVERY == 0:
                benign(f"after {case.name}")
        benign("after the suite")
    finally:
        listener.close()
        unix_listener.close()
        evidence.close()
    return SuiteReport(protections, reports, benign.calls, benign.failures, time_scale)


def run_warm(
    cases: list[Case],
    target: Target,
    progress: Callable[[int, int, CaseReport], None] | None = None,
    time_scale: float = 1.0,
) -> SuiteReport:
    """`run_suite` on a sandbox that prewarms children: every case runs twice.
    The first pass starts each case cold and leaves a warm child for its
    plugin; the reported pass runs on that warm child, whose replacement
    takes its descriptors over (a first warm child would count as a leak)."""
    run_suite(cases, target, time_scale=time_scale)
    return run_suite(cases, target, progress, time_scale=time_scale)


def self_check(sandbox: Sandbox, probes: Iterable[str] = PROBES) -> SuiteReport:
    """Run a few probe cases on `sandbox` (the server's own: its layers, its
    isolation level, its launcher) with a private registry (no metrics,
    nothing listed).

    Used by the server at start-up; `SuiteReport.ok` says whether containment holds.
    """
    registry = PluginRegistry()
    registry.load_directory(BUNDLED_DIR)
    loaded, _ = corpus.load_cases(names=probes)
    cases = [corpus.scaled(case, SELF_CHECK_TIME_SCALE) for case in loaded]
    for case in cases:
        registry.register(case.name, case.plugin)
    target = LocalTarget(ToolRunner(registry, sandbox))
    run = run_warm if sandbox.prewarm else run_suite
    return run(cases, target, time_scale=SELF_CHECK_TIME_SCALE)
