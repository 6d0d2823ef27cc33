"""The crash suite: hostile plugins run against the host to prove containment.

Each case is an ordinary plugin directory (bundled ones in `plugins/hostile/`)
whose manifest carries an `[expect]` table::

    [expect]
    category = "memory"
    outcome = ["PluginError:memory_limit"]       # "Type:reason", or "success"
    requires = ["network_namespace"]             # layers its defence needs ("a|b": either)
    claims = ["host_alive", "no_process_left"]   # optional; default: all of CLAIMS

A case passes when the observed outcome is one of `outcome`, the outcome can
be served as strict UTF-8 JSON (a lone surrogate or NaN in it would be a 500
at the API), and every claim holds afterwards. A case whose `requires` names
a layer the host does not have is reported NOT DEFENDED, never passed.
Benign calls run before, between and after the hostile ones and must keep
succeeding.

Targets: `LocalTarget` runs cases through a ToolRunner in this process;
`HttpTarget` sends them to a running server's `/v1/analyze`.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from host.discovery import BUNDLED_DIR, find_plugins
from host.registry import PluginRegistry, RegisteredPlugin
from sandbox.supervisor import uid_range
from sandbox.tool_runner import ToolRunner

HOSTILE_DIR = BUNDLED_DIR / "hostile"
CLAIMS = (
    "host_alive",
    "no_process_left",
    "no_fd_left",
    "no_file_outside_scratch",
    "host_rss_stable",
)
WATCHED_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
RSS_TOLERANCE_MB = 64.0
BENIGN_EVERY = 5
PASS, FAIL, NOT_DEFENDED = "pass", "FAIL", "not defended"


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    expected: tuple[str, ...]
    requires: tuple[str, ...]
    claims: tuple[str, ...]
    plugin: RegisteredPlugin


@dataclass
class CaseReport:
    name: str
    category: str
    expected: list[str]
    observed: str
    verdict: str
    seconds: float
    leftover_processes: int | None
    leftover_fds: int | None
    rss_change_mb: float | None
    problems: list[str] = field(default_factory=list)
    message: str = ""


@dataclass
class SuiteReport:
    protections: dict[str, bool]
    cases: list[CaseReport]
    benign_calls: int
    benign_failures: list[str]

    @property
    def failed(self) -> list[CaseReport]:
        return [c for c in self.cases if c.verdict == FAIL]

    @property
    def ok(self) -> bool:
        """True when no case broke containment and every benign call succeeded."""
        return not self.failed and not self.benign_failures

    def summary(self) -> dict[str, int]:
        return {
            "cases": len(self.cases),
            "passed": sum(c.verdict == PASS for c in self.cases),
            "failed": len(self.failed),
            "not_defended": sum(c.verdict == NOT_DEFENDED for c in self.cases),
            "benign_calls": self.benign_calls,
            "benign_failures": len(self.benign_failures),
        }


def load_cases(
    dirs: Iterable[str | Path] = (),
    names: Iterable[str] = (),
    categories: Iterable[str] = (),
) -> tuple[list[Case], list[str]]:
    """Cases from the bundled corpus plus `dirs`, filtered; and load errors."""
    wanted, kinds = set(names), set(categories)
    cases: list[Case] = []
    errors: list[str] = []
    for directory in [HOSTILE_DIR, *map(Path, dirs)]:
        found, problems = find_plugins(Path(directory))
        errors += problems
        for plugin in found:
            expect = plugin.manifest.expect
            if not expect or not isinstance(expect.get("outcome"), list):
                errors.append(
                    f"{plugin.directory / 'plugin.toml'}: field 'expect.outcome' is missing"
                )
                continue
            case = Case(
                name=plugin.name,
                category=str(expect.get("category", "other")),
                expected=tuple(str(o) for o in expect["outcome"]),
                requires=tuple(str(r) for r in expect.get("requires", [])),
                claims=tuple(str(c) for c in expect.get("claims", CLAIMS)),
                plugin=plugin,
            )
            if (not wanted or case.name in wanted) and (not kinds or case.category in kinds):
                cases.append(case)
    return cases, errors


def observed_of(result: dict[str, Any], error: dict[str, Any]) -> str:
    if not error:
        return "success"
    detail = error.get("error", error)
    return f"{detail.get('type')}:{detail.get('details', {}).get('reason')}"


def unservable(result: dict[str, Any], error: dict[str, Any]) -> str | None:
    """Why the API could not answer with this outcome (strict JSON, UTF-8), or None."""
    try:
        json.dumps([result, error], ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        return f"the outcome cannot be served as JSON: {str(exc)[:100]}"
    return None


def sandbox_processes(idle_uids: set[int] | None = None, only: set[int] | None = None) -> int:
    """Processes running under a sandbox uid (zombies and idle warm children
    aside), or under one of `only`."""
    count = 0
    idle = idle_uids or set()
    for proc in psutil.process_iter(["uids", "status"]):
        uids = proc.info["uids"]
        if not uids or (only is not None and uids.real not in only):
            continue
        if uids.real in uid_range() and uids.real not in idle:
            count += proc.info["status"] != psutil.STATUS_ZOMBIE
    return count


def stray_files(extra_dirs: Iterable[Path] = (), host_dirs: Iterable[Path] = ()) -> set[str]:
    """Entries owned by a sandbox uid in the world-writable dirs and `extra_dirs`,
    and every entry, whoever owns it, in `host_dirs` (the host's working and
    state directories, where a root-owned core dump of a call would land)."""
    found = set()
    for directory in [*map(Path, WATCHED_DIRS), *extra_dirs]:
        try:
            entries = list(directory.iterdir())
        except OSError:
            continue
        for entry in entries:
            try:
                uid = entry.lstat().st_uid
            except OSError:
                continue
            if uid in uid_range() or entry.name.startswith("plughost-escape"):
                found.add(str(entry))
    for directory in host_dirs:
        with contextlib.suppress(OSError):
            found.update(str(entry) for entry in directory.iterdir())
    return found


class Target(Protocol):
    local: bool

    def protections(self) -> dict[str, bool]: ...
    def call(
        self, case: str, image: bytes, options: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]: ...
    def alive(self) -> bool: ...
    def idle_uids(self) -> set[int]: ...
    def leftover_processes(self) -> int: ...
    def end_leftovers(self) -> None: ...
    def settle(self) -> None: ...


class LocalTarget:
    """Cases run through a ToolRunner in this very process."""

    local = True

    def __init__(self, registry: PluginRegistry, runner: ToolRunner | None = None) -> None:
        self.registry = registry
        self.runner = runner or ToolRunner()

    def protections(self) -> dict[str, bool]:
        return self.runner.sandbox.protections()

    def call(
        self, case: str, image: bytes, options: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.runner.run(case, {"image": image, "mime_type": "image/png", "options": options})

    def alive(self) -> bool:
        return True

    def idle_uids(self) -> set[int]:
        return self.runner.sandbox.warm_uids()

    def leftover_processes(self) -> int:
        """Processes of finished calls still alive: by uid on a root host; on
        one without per-call uids, every descendant of this host's launcher
        that is not a warm child waiting for its call."""
        sandbox = self.runner.sandbox
        if sandbox.active_layers()["privilege_drop"]:
            # Only uids this host used and nobody holds: another host's calls
            # on the same machine (a running server) are not counted.
            return sandbox_processes(only=sandbox.uids_at_rest())
        return len(_descendants(sandbox.launcher.pid, exclude=sandbox.warm_pids()))

    def end_leftovers(self) -> None:
        """Kill what a case the host could not defend left behind."""
        sandbox = self.runner.sandbox
        if sandbox.active_layers()["privilege_drop"]:
            return  # the next call with the same uid sweeps it
        for proc in _descendants(sandbox.launcher.pid, exclude=sandbox.warm_pids()):
            with contextlib.suppress(psutil.Error):
                proc.kill()

    def settle(self) -> None:
        # Warm children started in the background hold descriptors; let them
        # land before counting the host's descriptors.
        self.runner.sandbox.settle()


class HttpTarget:
    """Cases sent to a running server's `/v1/analyze` (the server must load the cases)."""

    local = False

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def protections(self) -> dict[str, bool]:
        _, body = self._request("GET", "/readyz")
        return dict(body.get("isolation", {})) if isinstance(body, dict) else {}

    def call(
        self, case: str, image: bytes, options: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        body = {
            "plugin": case,
            "image": base64.b64encode(image).decode(),
            "mime_type": "image/png",
            "options": options,
        }
        status, answer = self._request("POST", "/v1/analyze", body)
        if status == 200:
            return answer["result"], {}
        return {}, {"error": answer.get("detail", {}) if isinstance(answer, dict) else {}}

    def alive(self) -> bool:
        try:
            return self._request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def settle(self) -> None:
        """Nothing to wait for: the server's descriptors are not counted."""

    def idle_uids(self) -> set[int]:
        _, body = self._request("GET", "/readyz")
        return set(body.get("warm_uids", [])) if isinstance(body, dict) else set()

    def leftover_processes(self) -> int:
        # Only a root server's calls can be seen from here (by their uids).
        return sandbox_processes(self.idle_uids())

    def end_leftovers(self) -> None:
        pass  # a root server's next call with the same uid sweeps them


def sample_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 120, 200)).save(out, format="PNG")
    return out.getvalue()


class _Listener:
    """A server for the network cases to try to reach: TCP on the host's
    127.0.0.1, or (`unix=True`) a root-owned, world-connectable unix socket
    outside /tmp, where host services such as journald or D-Bus listen."""

    def __init__(self, unix: bool = False) -> None:
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
            conn.close()

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


def _descendants(pid: int | None, exclude: set[int]) -> list[psutil.Process]:
    """Live descendants of `pid`, minus the trees rooted at `exclude` (as
    psutil handles, which refuse to signal a pid that was reused since)."""
    if pid is None:
        return []
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    found = []
    for child in children:
        if child.pid in exclude:
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
        found += _descendants(child.pid, exclude)
    return found


def _settle(target: Target, deadline_s: float = 2.0) -> int:
    end = time.monotonic() + deadline_s
    while (left := target.leftover_processes()) and time.monotonic() < end:
        time.sleep(0.02)
    return left


def run_case(
    case: Case, target: Target, image: bytes, options: dict[str, Any], protections: dict[str, bool]
) -> CaseReport:
    """Run one case and check its claims."""
    process = psutil.Process()
    target.settle()
    fds_before = process.num_fds()
    rss_before = process.memory_info().rss
    host_dirs = [Path.cwd()]
    files_before = stray_files([case.plugin.directory], host_dirs)
    started = time.monotonic()
    result, error = target.call(case.name, image, options)
    seconds = time.monotonic() - started
    observed = observed_of(result, error)
    target.settle()  # replacement warm children land in the pool first
    leftover = _settle(target)
    problems = []
    fds = rss = None
    if observed not in case.expected:
        problems.append(f"expected {' or '.join(case.expected)}, observed {observed}")
    if problem := unservable(result, error):
        problems.append(problem)
    if "host_alive" in case.claims and not target.alive():
        problems.append("the host stopped answering")
    if "no_process_left" in case.claims and leftover:
        problems.append(f"{leftover} process(es) left behind")
    if target.local:
        fds = process.num_fds() - fds_before
        rss = (process.memory_info().rss - rss_before) / 2**20
        if "no_fd_left" in case.claims and fds > 0:
            problems.append(f"{fds} descriptor(s) left open in the host")
        if "host_rss_stable" in case.claims and rss > RSS_TOLERANCE_MB:
            problems.append(f"host RSS grew by {rss:.0f} MB")
    new_files = stray_files([case.plugin.directory], host_dirs) - files_before
    if "no_file_outside_scratch" in case.claims and new_files:
        problems.append(f"files written outside the scratch directory: {sorted(new_files)[:5]}")
    # "a|b": either layer is enough.
    missing = [r for r in case.requires if not any(protections.get(a) for a in r.split("|"))]
    if missing:
        verdict = NOT_DEFENDED
        problems.insert(0, f"not defended here: needs {', '.join(missing)}")
        if leftover:
            target.end_leftovers()  # so the cases after it are judged on their own
    else:
        verdict = FAIL if problems else PASS
    detail = error.get("error", {}) if error else {}
    return CaseReport(
        name=case.name,
        category=case.category,
        expected=list(case.expected),
        observed=observed,
        verdict=verdict,
        seconds=round(seconds, 3),
        leftover_processes=leftover,
        leftover_fds=fds,
        rss_change_mb=None if rss is None else round(rss, 1),
        problems=problems,
        message=str(detail.get("message", ""))[:200],
    )


def run_suite(
    cases: list[Case],
    target: Target,
    progress: Callable[[int, int, CaseReport], None] | None = None,
    benign_plugin: str = "image_info",
) -> SuiteReport:
    """Run every case with benign calls around them; never raises for a case."""
    image = sample_png()
    protections = target.protections()
    listener, unix_listener = _Listener(), _Listener(unix=True)
    benign_calls, benign_failures = 0, []

    def benign(where: str) -> None:
        nonlocal benign_calls
        benign_calls += 1
        result, error = target.call(benign_plugin, image, {})
        if error or not result:
            benign_failures.append(f"{where}: {observed_of(result, error)}")

    reports = []
    try:
        benign("before the suite")
        for index, case in enumerate(cases, 1):
            options = {
                "listener_port": listener.port,
                "unix_listener_path": unix_listener.path,
                "host_pid": os.getpid(),
                "host_cwd": os.getcwd(),
            }
            report = run_case(case, target, image, options, protections)
            reports.append(report)
            if progress is not None:
                progress(index, len(cases), report)
            if index % BENIGN_EVERY == 0:
                benign(f"after {case.name}")
        benign("after the suite")
    finally:
        listener.close()
        unix_listener.close()
    return SuiteReport(protections, reports, benign_calls, benign_failures)


def format_table(report: SuiteReport) -> str:
    header = (
        "CASE",
        "CATEGORY",
        "EXPECTED",
        "OBSERVED",
        "VERDICT",
        "TIME",
        "PROCS",
        "FDS",
        "RSS Δ MB",
    )
    rows = [header]
    for c in report.cases:
        rows.append(
            (
                c.name,
                c.category,
                " | ".join(c.expected),
                c.observed,
                c.verdict,
                f"{c.seconds:.2f}s",
                str(c.leftover_processes),
                "-" if c.leftover_fds is None else str(c.leftover_fds),
                "-" if c.rss_change_mb is None else f"{c.rss_change_mb:+.1f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    for c in report.cases:
        if c.problems and c.verdict != PASS:
            lines.append(f"  {c.verdict}: {c.name}: {'; '.join(c.problems)}")
    active = [name for name, on in report.protections.items() if on]
    off = [name for name, on in report.protections.items() if not on]
    lines.append(f"isolation layers active: {', '.join(active) or 'none'}")
    lines.append(f"missing or off: {', '.join(off) or 'none'}")
    s = report.summary()
    lines.append(
        f"{s['passed']} passed, {s['failed']} failed, {s['not_defended']} not defended here; "
        f"benign calls {s['benign_calls'] - s['benign_failures']}/{s['benign_calls']} succeeded"
    )
    for failure in report.benign_failures:
        lines.append(f"  benign call failed {failure}")
    return "\n".join(lines)


def to_json(report: SuiteReport) -> dict[str, Any]:
    return {
        "summary": report.summary(),
        "ok": report.ok,
        "protections": report.protections,
        "benign_failures": report.benign_failures,
        "cases": [asdict(c) for c in report.cases],
    }


def to_junit(report: SuiteReport) -> str:
    s = report.summary()
    root = ET.Element("testsuites", name="plughost")
    suite = ET.SubElement(
        root,
        "testsuite",
        name="plughost-crash-suite",
        tests=str(s["cases"] + 1),
        failures=str(s["failed"] + (1 if report.benign_failures else 0)),
        skipped=str(s["not_defended"]),
        errors="0",
        time=f"{sum(c.seconds for c in report.cases):.3f}",
    )
    for c in report.cases:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"crash_suite.{c.category}",
            name=c.name,
            time=f"{c.seconds:.3f}",
        )
        if c.verdict == FAIL:
            failure = ET.SubElement(
                case, "failure", message="; ".join(c.problems)[:500], type="containment"
            )
            failure.text = json.dumps(asdict(c), indent=2)
        elif c.verdict == NOT_DEFENDED:
            ET.SubElement(case, "skipped", message="; ".join(c.problems)[:500])
    benign = ET.SubElement(
        suite, "testcase", classname="crash_suite.benign", name="benign_calls_keep_succeeding"
    )
    if report.benign_failures:
        ET.SubElement(
            benign, "failure", message="; ".join(report.benign_failures)[:500], type="availability"
        )
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


def write_reports(report: SuiteReport, json_path: str | None, junit_path: str | None) -> None:
    if json_path:
        Path(json_path).write_text(json.dumps(to_json(report), indent=2))
    if junit_path:
        Path(junit_path).write_text(to_junit(report))


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


def self_check(probes: Iterable[str] = PROBES) -> SuiteReport:
    """Run a few probe cases in a private registry (no metrics, nothing listed).

    Used by the server at start-up; `SuiteReport.ok` says whether containment holds.
    """
    registry = PluginRegistry()
    registry.load_directory(BUNDLED_DIR)
    cases, _ = load_cases(names=probes)
    for case in cases:
        registry.register(case.name, case.plugin)
    return run_suite(cases, LocalTarget(registry, ToolRunner(registry=registry)))


__all__ = [
    "CLAIMS",
    "PROBES",
    "Case",
    "CaseReport",
    "HttpTarget",
    "LocalTarget",
    "SuiteReport",
    "load_cases",
    "run_case",
    "run_suite",
    "self_check",
]
