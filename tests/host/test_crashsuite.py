"""`plughost crash-suite`: the whole corpus passes here or is reported not
defended, a wrong expectation makes it exit 1, and its reports parse."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import junitparser
import pytest
from fastapi.testclient import TestClient

from host import crashsuite
from host.api import Services, create_app
from host.config import Settings
from host.registry import PluginRegistry
from host.services import (
    AnalysisService,
    JobManagementService,
    MemoryJobStore,
    PluginManagementService,
)
from sandbox import supervisor
from sandbox.cgroups import CallCgroup, CgroupPool
from sandbox.supervisor import SETUP_FAILURES_NOT_READY, Sandbox
from tests.conftest import HOSTILE_DIR
from tests.host.test_serve import BODY, free_port, request, start_server, stop

ROOT = Path(__file__).resolve().parents[2]


def crash_suite(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "host.cli", "crash-suite", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.no_leak_check
def test_whole_corpus_passes_or_is_reported_not_defended(tmp_path: Path) -> None:
    result = crash_suite("--json", str(tmp_path / "r.json"), "--junit", str(tmp_path / "r.xml"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    summary = report["summary"]
    assert summary["cases"] >= 40 and summary["failed"] == 0
    assert summary["benign_failures"] == 0 and summary["benign_calls"] >= 3
    categories = {c["category"] for c in report["cases"]}
    assert {"time", "memory", "crash", "output", "protocol", "processes", "escape"} <= categories
    for case in report["cases"]:
        if case["verdict"] == "not defended":
            # Never counted as passed, and the reason names the missing layer.
            assert case["problems"][0].startswith("not defended here: needs ")
            missing = case["problems"][0].removeprefix("not defended here: needs ").split(", ")
            assert not any(report["protections"].get(layer) for layer in missing)
        else:
            assert case["verdict"] == "pass" and case["observed"] in case["expected"]
            assert case["leftover_processes"] == 0 and case["leftover_fds"] <= 0
    assert "passed" in result.stdout and "not defended here" in result.stdout
    assert "[" in result.stderr  # progress lines while it runs
    cases = [
        case for suite in junitparser.JUnitXml.fromfile(str(tmp_path / "r.xml")) for case in suite
    ]
    assert len(cases) == summary["cases"] + 1
    skipped = [c for c in cases if c.result and isinstance(c.result[0], junitparser.Skipped)]
    assert len(skipped) == summary["not_defended"]
    assert not any(c.result and isinstance(c.result[0], junitparser.Failure) for c in cases)


@pytest.mark.no_leak_check
def test_time_scale_gives_every_case_more_time_and_says_so(tmp_path: Path) -> None:
    result = crash_suite(
        "--time-scale", "3", "--case", "sleep_forever", "--case", "stdout_flood",
        "--json", str(tmp_path / "r.json"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["time_scale"] == 3
    seconds = {case["name"]: case["seconds"] for case in report["cases"]}
    assert seconds["sleep_forever"] >= 2.9  # its manifest says 1 s
    assert "time scale: x3" in result.stdout
    refused = crash_suite("--time-scale", "0.5", "--case", "sleep_forever")
    assert refused.returncode == 2 and "--time-scale: must be between 1 and 100" in refused.stderr


def test_write_corpus_scales_each_cases_timeout_for_a_server(tmp_path: Path) -> None:
    result = crash_suite(
        "--time-scale", "5", "--write-corpus", str(tmp_path / "corpus"),
        "--case", "sleep_forever", "--case", "import_hang",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cases, errors = crashsuite.load_cases([], ["sleep_forever", "import_hang"])
    written, _ = crashsuite.load_cases([tmp_path / "corpus"], ["sleep_forever", "import_hang"])
    assert not errors and len(written) == 4  # the bundled pair, then the copies
    original = {c.name: c.plugin.manifest for c in cases}
    for case in written[2:]:
        manifest = case.plugin.manifest
        assert case.plugin.directory.parent == tmp_path / "corpus"
        assert manifest.limits.timeout_s == 5 * (original[case.name].limits.timeout_s or 0)
        assert manifest.expect == original[case.name].expect
    again = crash_suite("--write-corpus", str(tmp_path / "corpus"), "--case", "sleep_forever")
    assert again.returncode == 2 and "wants a new directory" in again.stderr


@pytest.mark.no_leak_check
def test_a_wrong_expectation_makes_the_suite_exit_one(tmp_path: Path) -> None:
    case = tmp_path / "cases" / "lying_segfault"
    shutil.copytree(HOSTILE_DIR / "segfault", case)
    manifest = case / "plugin.toml"
    manifest.write_text(
        manifest.read_text()
        .replace('name = "segfault"', 'name = "lying_segfault"')
        .replace('outcome = ["PluginError:crashed"]', 'outcome = ["success"]')
    )
    junit = tmp_path / "r.xml"
    result = crash_suite(
        "--plugins-dir",
        str(tmp_path / "cases"),
        "--case",
        "lying_segfault",
        "--case",
        "exit_zero",
        "--junit",
        str(junit),
    )
    assert result.returncode == 1
    assert (
        "FAIL" in result.stdout
        and "expected success, observed PluginError:crashed" in result.stdout
    )
    failures = [
        c
        for suite in junitparser.JUnitXml.fromfile(str(junit))
        for c in suite
        if c.result and isinstance(c.result[0], junitparser.Failure)
    ]
    assert [c.name for c in failures] == ["lying_segfault"]


@pytest.mark.no_leak_check
def test_filters_select_cases() -> None:
    result = crash_suite("--category", "protocol")
    assert result.returncode == 0
    rows = [line.split()[0] for line in result.stdout.splitlines()[1:] if "  protocol  " in line]
    assert "garbage_frame" in rows and "busy_loop" not in result.stdout
    assert crash_suite("--case", "no_such_case").returncode == 2


@pytest.mark.no_leak_check
def test_suite_runs_against_a_running_server(tmp_path: Path) -> None:
    port = free_port()
    server = start_server(tmp_path / "jobs.sqlite3", port)
    try:
        result = crash_suite(
            "--http",
            f"http://127.0.0.1:{port}",
            "--category",
            "crash",
            "--json",
            str(tmp_path / "r.json"),
        )
    finally:
        stop(server)
    assert result.returncode == 0, result.stdout[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["passed"] >= 8 and report["summary"]["failed"] == 0
    assert all(c["leftover_fds"] is None for c in report["cases"])  # not measurable remotely


@pytest.mark.no_leak_check
def test_local_suite_beside_a_serving_host_counts_only_its_own_calls(tmp_path: Path) -> None:
    # The server shares the test run's uid range and keeps a warm child per
    # plugin it served: processes under sandbox uids that are not the suite's.
    port = free_port()
    server = start_server(tmp_path / "jobs.sqlite3", port)
    try:
        status, _ = request(port, "POST", "/v1/analyze", BODY)
        assert status == 200
        result = crash_suite("--case", "raise_kaboom", "--case", "segfault", "--case", "exit_zero")
    finally:
        stop(server)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "left behind" not in result.stdout


def _client(registry: PluginRegistry, sandbox: Sandbox, **settings: object) -> TestClient:
    plugins = PluginManagementService(registry, sandbox)
    jobs = JobManagementService(plugins, MemoryJobStore())
    services = Services(plugins, jobs, AnalysisService(jobs))
    return TestClient(create_app(Settings(**settings), services))


def test_server_self_check_is_reported_at_readyz(
    registry: PluginRegistry, sandbox: Sandbox
) -> None:
    with _client(registry, sandbox) as client:
        body = client.get("/readyz").json()
    assert body["ready"] is True
    assert body["self_check"]["ok"] is True
    assert body["self_check"]["passed"] == len(crashsuite.PROBES)


def test_server_refuses_to_serve_when_containment_is_broken(
    registry: PluginRegistry, sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = tmp_path / "escapes"
    shutil.copytree(HOSTILE_DIR / "read_host_env_vars", case)
    manifest = case / "plugin.toml"
    manifest.write_text(
        manifest.read_text()
        .replace('name = "read_host_env_vars"', 'name = "escapes"')
        .replace('outcome = ["ExecutionError:plugin_raised"]', 'outcome = ["success"]')
    )
    real_load: Callable[..., tuple] = crashsuite.load_cases
    monkeypatch.setattr(
        crashsuite.cases,
        "load_cases",
        lambda dirs=(), names=(), categories=(): real_load([tmp_path], ["escapes"], categories),
    )
    with _client(registry, sandbox) as client:  # without the option it serves, and says so
        answer = client.get("/readyz")
        check = answer.json()["self_check"]
        assert check["ok"] is False and check["failed_cases"] == ["escapes"]
        # Which probe failed, never its evidence (which can name host files).
        evidence = client.app.state.self_check["failed_cases"]["escapes"]
        assert evidence and not any(problem in answer.text for problem in evidence)
        # ... but never calls itself ready: nothing should send it traffic.
        assert answer.status_code == 503 and answer.json()["ready"] is False
        [reason] = answer.json()["reasons"]
        assert reason.startswith("the containment self-check failed: ")
        assert "escapes" in reason
    with pytest.raises(RuntimeError, match="refusing to serve"):
        with _client(registry, sandbox, require_containment=True):
            pass


def test_the_self_check_gives_its_probes_time_for_a_slow_machine(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, float] = {}
    real_run = crashsuite.runner.run_suite

    def recording(cases: list[crashsuite.Case], *args: Any, **kwargs: Any) -> Any:
        seen.update({c.name: c.plugin.manifest.limits.timeout_s or 0 for c in cases})
        return real_run(cases, *args, **kwargs)

    monkeypatch.setattr(crashsuite.runner, "run_suite", recording)
    report = crashsuite.self_check(sandbox)
    assert report.ok and report.time_scale == crashsuite.runner.SELF_CHECK_TIME_SCALE
    # No probe expects a timeout; each gets ten times its manifest's 1 s.
    assert set(seen) == set(crashsuite.PROBES)
    assert all(timeout == 10 for timeout in seen.values()), seen


def test_readyz_is_503_while_calls_cannot_be_set_up(
    registry: PluginRegistry, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {**BODY, "plugin": "image_probe"}
    headers = {"authorization": "Bearer t"}
    with _client(registry, sandbox, self_check=False, client_tokens=["t"]) as client:
        assert client.get("/readyz").status_code == 200

        def refused(*args: object, **kwargs: object) -> CallCgroup:
            raise OSError(13, "Permission denied", "/sys/fs/cgroup/call-x/memory.max")

        monkeypatch.setattr(CgroupPool, "take", refused)
        for _ in range(SETUP_FAILURES_NOT_READY):
            assert client.post("/v1/analyze", json=body, headers=headers).status_code >= 500
        answer = client.get("/readyz")
        assert answer.status_code == 503
        [reason] = answer.json()["reasons"]
        assert f"{SETUP_FAILURES_NOT_READY} calls in a row failed at set-up" in reason
        assert "/sys" not in reason  # anyone may ask /readyz: the path is for the log
        # Taken out of service, the host gets no call to prove it recovered:
        # the problem expires, and it is tried again.
        monkeypatch.setattr(supervisor, "SETUP_PROBLEM_S", 0.0)
        assert client.get("/readyz").status_code == 200
        monkeypatch.undo()
        assert client.post("/v1/analyze", json=body, headers=headers).status_code == 200
        assert client.get("/readyz").status_code == 200


def test_a_case_claiming_a_bundled_plugins_name_is_skipped(tmp_path: Path) -> None:
    impostor = tmp_path / "cases" / "image_info"
    shutil.copytree(HOSTILE_DIR / "raise_kaboom", impostor)
    manifest = impostor / "plugin.toml"
    manifest.write_text(manifest.read_text().replace('"raise_kaboom"', '"image_info"'))
    result = crash_suite("--plugins-dir", str(tmp_path / "cases"), "--case", "image_info")
    assert result.returncode == 2
    assert f"case image_info in {impostor} claims the name of the bundled plugin" in result.stderr


def test_self_check_of_a_strict_server_sees_what_its_calls_would_see(
    registry: PluginRegistry,
) -> None:
    strict = Sandbox(isolation="strict", disabled=["seccomp"])
    try:
        with _client(registry, strict) as client:
            check = client.get("/readyz").json()["self_check"]
            full = client.app.state.self_check
    finally:
        strict.close()
    # Strict isolation refuses every call while a layer is off: so do the probes.
    assert check["ok"] is False and check["missing_layers"] == ["seccomp"]
    assert check["failed"] == len(crashsuite.PROBES) and check["benign_failures"] == 3
    assert check["failed_cases"] == sorted(crashsuite.PROBES)
    assert all(
        any("observed InternalError:internal" in p for p in problems)
        for problems in full["failed_cases"].values()
    )
