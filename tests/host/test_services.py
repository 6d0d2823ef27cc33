"""The service layers delegate down the one execution path, keep jobs, and
quarantine plugins that keep failing."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from host.errors import JobFinished, JobNotFound, Overloaded, Rejected
from host.registry import PluginRegistry
from host.services import (
    AnalysisService,
    JobManagementService,
    JobStatus,
    MemoryJobStore,
    PluginManagementService,
    SQLiteJobStore,
)
from host.services.analysis import job_outcome
from host.services.jobrows import Admit, Idempotency, Keyed
from host.services.store import Job, now_iso
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner


@pytest.fixture
def plugins(registry: PluginRegistry, sandbox: Sandbox) -> PluginManagementService:
    return PluginManagementService(registry, sandbox)


@pytest.fixture
def jobs(plugins: PluginManagementService) -> JobManagementService:
    service = JobManagementService(plugins, MemoryJobStore(), workers=2, queue_size=2)
    yield service
    service.shutdown(timeout_s=5)


def test_plugin_service_delegates_to_the_tool_runner_class(
    plugins: PluginManagementService, payload: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, Any]] = []

    def fake(self: ToolRunner, plugin_name: str, payload: Any) -> tuple[dict, dict]:
        seen.append((plugin_name, payload))
        return {"fake": True}, {}

    monkeypatch.setattr(ToolRunner, "run", fake)
    assert plugins.execute_plugin("image_info", payload) == ({"fake": True}, {})
    assert seen == [("image_info", payload)]


def test_job_service_delegates_to_execute_plugin_and_records_success_and_failure(
    jobs: JobManagementService, payload: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def fake(
        self: PluginManagementService,
        plugin_name: str,
        payload: Any,
        cancel: Any = None,
        owner: Any = None,
    ):
        calls.append(plugin_name)
        if plugin_name == "raise_kaboom":
            return {}, {
                "error": {
                    "type": "ExecutionError",
                    "message": "kaboom",
                    "details": {"reason": "plugin_raised"},
                },
                "_internal": {"traceback": "tb"},
            }
        return {"ok": 1}, {}

    monkeypatch.setattr(PluginManagementService, "execute_plugin", fake)
    good = jobs.enqueue("image_info", payload)[1].result(timeout=30)
    bad = jobs.enqueue("raise_kaboom", payload)[1].result(timeout=30)
    assert calls == ["image_info", "raise_kaboom"]
    assert good.status is JobStatus.SUCCESS and good.result == {"ok": 1}
    assert bad.status is JobStatus.FAILED and bad.error["message"] == "kaboom"
    assert "_internal" not in bad.error and "traceback" not in str(bad.public())
    # the input is dropped once finished
    assert jobs.store.payload(good.id) is None and jobs.store.payload(bad.id) is None


def test_analysis_service_delegates_to_the_job_service(
    jobs: JobManagementService, payload: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real = JobManagementService.enqueue

    def spy(
        self: JobManagementService,
        plugin_name: str,
        payload: Any,
        owner: str,
        key: str | None = None,
        callback_url: str | None = None,
    ):
        seen.append(plugin_name)
        return real(self, plugin_name, payload, owner, key, callback_url)

    monkeypatch.setattr(JobManagementService, "enqueue", spy)
    analysis = AnalysisService(jobs, default_plugin="image_info")
    _, future = analysis.submit(None, payload)
    result, error = job_outcome(future.result(timeout=30))
    assert error == {} and result["format"] == "PNG"
    assert seen == ["image_info"]
    page = jobs.list_jobs(status=JobStatus.SUCCESS)
    assert page.total == 1 and json.loads(page.documents[0])["plugin"] == "image_info"


def test_bad_input_is_refused_before_a_job_exists(jobs: JobManagementService) -> None:
    with pytest.raises(Rejected) as info:
        jobs.enqueue("image_info", {"image": b"", "mime_type": "image/png"})
    assert info.value.reason == "invalid_input"
    with pytest.raises(Rejected) as info:
        jobs.enqueue("nope", {"image": b"x", "mime_type": "image/png"})
    assert info.value.reason == "unknown_plugin"
    assert jobs.list_jobs().total == 0


def test_full_queue_answers_overloaded_and_stores_nothing(
    jobs: JobManagementService, payload: dict
) -> None:
    accepted = [jobs.enqueue("sleep_forever", payload)[0] for _ in range(4)]  # 2 workers + 2 queued
    with pytest.raises(Overloaded) as info:
        jobs.enqueue("image_info", payload)
    assert info.value.envelope["error"]["details"]["retry_after_s"] >= 1
    assert jobs.list_jobs().total == 4
    for job in accepted:
        jobs.cancel_job(job.id, wait_s=0)


def test_cancel_kills_a_running_sandbox(jobs: JobManagementService, payload: dict) -> None:
    job, future = jobs.enqueue("sleep_forever", payload)
    deadline = time.monotonic() + 5
    while jobs.get_job(job.id).status is not JobStatus.RUNNING and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    cancelled = jobs.cancel_job(job.id)
    assert cancelled.status is JobStatus.CANCELLED
    assert cancelled.error["details"]["reason"] == "cancelled"
    assert time.monotonic() - started < 0.9  # well before the plugin's 1 s timeout
    assert future.result(timeout=5).status is JobStatus.CANCELLED


def test_cancel_of_a_queued_job_means_it_never_runs(
    jobs: JobManagementService, payload: dict
) -> None:
    blockers = [jobs.enqueue("sleep_forever", payload)[0] for _ in range(2)]
    queued, future = jobs.enqueue("image_info", payload)
    assert jobs.cancel_job(queued.id, wait_s=0).status is JobStatus.CANCELLED
    for job in blockers:
        jobs.cancel_job(job.id)
    assert future.result(timeout=5).status is JobStatus.CANCELLED
    assert jobs.get_job(queued.id).started_at is None


def test_cancel_errors(jobs: JobManagementService, payload: dict) -> None:
    with pytest.raises(JobNotFound):
        jobs.cancel_job("nope")
    job = jobs.enqueue("image_info", payload)[1].result(timeout=30)
    with pytest.raises(JobFinished):
        jobs.cancel_job(job.id)


def test_plugin_is_quarantined_after_repeated_crashes_and_others_keep_running(
    plugins: PluginManagementService, payload: dict
) -> None:
    plugins.quarantine.threshold = 3
    reasons = [
        plugins.execute_plugin("segfault", payload)[1]["error"]["details"]["reason"]
        for _ in range(4)
    ]
    assert reasons == ["crashed", "crashed", "crashed", "quarantined"]
    assert plugins.describe("segfault")["quarantine"]["quarantined"] is True
    with pytest.raises(Rejected) as info:
        plugins.check("segfault", payload)
    assert info.value.reason == "quarantined"
    assert info.value.envelope["error"]["details"]["retry_after_s"] > 0
    assert plugins.execute_plugin("image_info", payload)[1] == {}
    plugins.reset_quarantine("segfault")
    assert plugins.execute_plugin("segfault", payload)[1]["error"]["details"]["reason"] == "crashed"


def test_a_success_ends_the_unavailable_streak(
    plugins: PluginManagementService, payload: dict
) -> None:
    plugins.quarantine.record("image_info", unavailable=True)
    plugins.quarantine.record("image_info", unavailable=True)
    plugins.execute_plugin("image_info", payload)
    assert plugins.quarantine.status("image_info")["unavailable_streak"] == 0


def test_quarantine_ends_after_the_cooldown(plugins: PluginManagementService) -> None:
    plugins.quarantine.cooldown_s = 0.05
    for _ in range(3):
        plugins.quarantine.record("p", unavailable=True)
    assert plugins.quarantine.retry_after("p") is not None
    time.sleep(0.06)
    assert plugins.quarantine.retry_after("p") is None


def test_sqlite_store_keeps_jobs_across_reopen_and_marks_unfinished_interrupted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SQLiteJobStore(path)
    store.add(
        Job("a", "image_info", JobStatus.PENDING, now_iso()),
        {"image": b"\x00\x01", "mime_type": "image/png"},
    )
    store.add(
        Job("b", "image_info", JobStatus.SUCCESS, now_iso(), result={"x": 1}),
        {"image": b"\x02", "mime_type": "image/png"},
    )
    assert store.payload("a")["image"] == b"\x00\x01"
    store.close()
    reopened = SQLiteJobStore(path)
    assert reopened.recover({"type": "InternalError", "details": {"reason": "interrupted"}}) == 1
    assert reopened.get("a").status is JobStatus.INTERRUPTED and reopened.payload("a") is None
    assert reopened.get("b").result == {"x": 1}
    page = reopened.page(None, JobStatus.SUCCESS, None, 10, 0, 1 << 20)
    assert page.total == 1 and json.loads(page.documents[0])["id"] == "b"
    assert reopened.prune(older_than_s=3600) == 0
    time.sleep(0.01)
    assert reopened.prune(older_than_s=0.001) == 2
    reopened.close()


def test_a_call_is_recorded_once_with_its_peak_memory(
    plugins: PluginManagementService, payload: dict
) -> None:
    result, error = plugins.execute_plugin("image_info", payload)
    assert error == {} and result["format"] == "PNG"
    metrics = plugins.describe("image_info")["metrics"]
    assert metrics["success_count"] == 1 and metrics["error_count"] == 0
    assert metrics["last_peak_rss_mb"] > 0
    assert plugins.metrics.calls("image_info", "success") == 1
    _, error = plugins.execute_plugin("nope", payload)
    assert error["error"]["details"]["reason"] == "unknown_plugin"
    assert plugins.metrics.calls("nope", "unknown_plugin") == 0  # no label for any name sent


def test_the_recorded_peak_memory_feeds_the_histogram_and_the_ring_keeps_the_outcome(
    plugins: PluginManagementService, payload: dict
) -> None:
    result, error = plugins.execute_plugin("image_info", payload)
    assert error == {} and result["format"] == "PNG"
    peak_mb = plugins.describe("image_info")["metrics"]["last_peak_rss_mb"]
    figures = plugins.metrics.figures("image_info")
    assert figures.memory.count == 1 and figures.latency.count == 1
    assert figures.max_peak_bytes == int(peak_mb * 1024 * 1024) > 0
    _, error = plugins.execute_plugin("image_info", {**payload, "image": b"not an image"})
    assert error
    recent = plugins.recent.of("image_info")
    assert [entry["outcome"] for entry in recent] == [
        error["error"]["details"]["reason"],
        "success",
    ]
    assert recent[1]["result_keys"] == sorted(result)[:20] and recent[0]["error"]["message"]


class _CountingStore(SQLiteJobStore):
    """The SQLite store, counting the writes (each a commit) it is asked for."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes: list[tuple[str, str]] = []

    def add(
        self,
        job: Job,
        payload: dict[str, Any] | None,
        idem: Idempotency | None = None,
        admit: Admit | None = None,
    ) -> Keyed | None:
        self.writes.append(("add", job.status.value))
        return super().add(job, payload, idem, admit)

    def update(self, job: Job) -> None:
        self.writes.append(("update", job.status.value))
        super().update(job)


@pytest.fixture
def counted(
    plugins: PluginManagementService, tmp_path: Path
) -> tuple[JobManagementService, _CountingStore]:
    store = _CountingStore(tmp_path / "jobs.sqlite3")
    service = JobManagementService(plugins, store, workers=2, queue_size=2)
    yield service, store
    service.shutdown(timeout_s=5)


def test_a_waited_job_is_stored_once_as_it_ends(
    counted: tuple[JobManagementService, _CountingStore], payload: dict
) -> None:
    jobs, store = counted
    analysis = AnalysisService(jobs)
    job, future = analysis.submit("image_info", payload, "alice", waited=True)
    assert store.get(job.id) is None or future.done()
    done = future.result(timeout=30)
    assert done.status is JobStatus.SUCCESS
    assert store.writes == [("add", "SUCCESS")]  # one commit on the way to the answer
    stored = jobs.get_job(job.id, owner="alice")
    assert stored.result == done.result and stored.started_at and stored.finished_at
    assert store.payload(job.id) is None  # a finished job keeps no input
    assert store.usage("alice").jobs == 1
    # A job that is not waited for is stored as it is accepted, and as it runs.
    store.writes.clear()
    jobs.enqueue("image_info", payload, "alice")[1].result(timeout=30)
    assert store.writes == [("add", "PENDING"), ("update", "RUNNING"), ("update", "SUCCESS")]


def test_a_waited_job_its_caller_stops_waiting_for_is_stored_and_goes_on(
    counted: tuple[JobManagementService, _CountingStore],
    payload: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jobs, store = counted
    release = threading.Event()
    running = threading.Event()

    def slow(
        self: PluginManagementService,
        plugin_name: str,
        payload: Any,
        cancel: Any = None,
        owner: Any = None,
    ):
        running.set()
        release.wait(20)
        return {"late": True}, {}

    monkeypatch.setattr(PluginManagementService, "execute_plugin", slow)
    analysis = AnalysisService(jobs)
    job, future = analysis.submit("image_info", payload, "alice", waited=True)
    assert running.wait(10)
    with pytest.raises(JobNotFound):
        jobs.get_job(job.id)  # nobody but its caller knows of it yet
    followed = analysis.stop_waiting(job)
    assert followed.status is JobStatus.RUNNING
    assert jobs.get_job(job.id, owner="alice").status is JobStatus.RUNNING
    assert store.payload(job.id) is not None  # kept while it runs, as for any job
    release.set()
    assert future.result(timeout=30).result == {"late": True}
    assert jobs.get_job(job.id).status is JobStatus.SUCCESS
    assert store.payload(job.id) is None
    assert store.writes == [("add", "RUNNING"), ("update", "SUCCESS")]
    assert analysis.stop_waiting(job).status is JobStatus.SUCCESS  # ended: as stored


def test_a_waited_job_whose_run_fails_outright_leaves_nothing_behind(
    counted: tuple[JobManagementService, _CountingStore],
    payload: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jobs, store = counted

    def broken(
        self: PluginManagementService,
        plugin_name: str,
        payload: Any,
        cancel: Any = None,
        owner: Any = None,
    ):
        raise RuntimeError("the runner broke")

    monkeypatch.setattr(PluginManagementService, "execute_plugin", broken)
    job, future = jobs.run_waited("image_info", payload)
    with pytest.raises(RuntimeError):
        future.result(timeout=30)
    assert jobs.record_waited(job.id) is None
    assert jobs.stats()["queued"] == 0 and jobs.stats()["running"] == 0
