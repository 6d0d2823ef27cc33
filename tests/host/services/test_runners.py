"""JobManagementService keeps the records and composes a runner for where
jobs run (host/services/runners.py): the default LocalPool, or any other
JobRunner, whose jobs end through the one recording path
(host/services/finished.py)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest

from host.errors import JobFinished, QuotaExceeded, ServiceError, ShuttingDown, envelope
from host.registry import PluginRegistry
from host.services import (
    JobLimits,
    JobManagementService,
    JobStatus,
    MemoryJobStore,
    PluginManagementService,
)
from host.services.finished import finished_job, record_finished
from host.services.runners import LocalPool
from host.services.store import Job, now_iso
from sandbox.supervisor import Sandbox
from tests.conftest import wait_until

PLUGIN = "image_info"


class Refused(ServiceError):
    def __init__(self) -> None:
        super().__init__(envelope("overloaded", "no room", plugin=PLUGIN))


@dataclass
class ElsewhereRunner:
    """A runner whose jobs run outside this process; it records what it is asked."""

    refuse: bool = False
    in_process: bool = False
    calls: list[tuple[str, Any]] = field(default_factory=list)
    futures: dict[str, Future[Job]] = field(default_factory=dict)

    def admit(self, plugin_name: str) -> None:
        self.calls.append(("admit", plugin_name))
        if self.refuse:
            raise Refused()

    def withdraw(self) -> None:
        self.calls.append(("withdraw", None))

    def submit(self, job_id: str) -> Future[Job]:
        self.calls.append(("submit", job_id))
        return self.futures.setdefault(job_id, Future())

    def follow(self, job_id: str) -> Future[Job] | None:
        return self.futures.get(job_id)

    def cancel(self, job: Job) -> None:
        self.calls.append(("cancel", job.status))

    def retry_after(self) -> float:
        return 7.0

    def stats(self) -> dict[str, int]:
        return {"workers": 5, "queue_size": 0, "running": 2, "queued": 3}

    def nodes(self) -> list[dict[str, Any]]:
        return [{"name": "w1", "state": "live", "last_seen": now_iso()}]

    def shutdown(self, timeout_s: float) -> None:
        self.calls.append(("shutdown", timeout_s))


@pytest.fixture
def plugins(registry: PluginRegistry, sandbox: Sandbox) -> PluginManagementService:
    return PluginManagementService(registry, sandbox)


def calls_end_with(
    monkeypatch: pytest.MonkeyPatch,
    outcome: tuple[dict[str, Any], dict[str, Any]],
    gate: threading.Event | None = None,
) -> None:
    """Every plugin call ends with `outcome` (once `gate`, if given, is set)."""

    def fake(*_: Any, **__: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        assert gate is None or gate.wait(30)
        return outcome

    monkeypatch.setattr(PluginManagementService, "execute_plugin", fake)


def stored_record(job: Job) -> dict[str, Any]:
    """What is stored of a finished job, but for its id and times."""
    doc = job.public()
    for key in ("id", "created_at", "started_at", "finished_at"):
        doc.pop(key, None)
    if doc.get("error"):
        doc["error"] = {k: v for k, v in doc["error"].items() if k != "timestamp"}
    return doc


@pytest.fixture
def elsewhere(
    plugins: PluginManagementService,
) -> tuple[ElsewhereRunner, JobManagementService]:
    """A job service whose runner runs jobs elsewhere; at most 1 job per owner."""
    runner = ElsewhereRunner()
    limits = JobLimits(max_jobs_per_client=1)
    return runner, JobManagementService(plugins, MemoryJobStore(), runner=runner, limits=limits)


def test_a_refusing_runner_leaves_nothing_stored(
    plugins: PluginManagementService, payload: dict
) -> None:
    runner = ElsewhereRunner(refuse=True)
    jobs = JobManagementService(plugins, MemoryJobStore(), runner=runner)
    with pytest.raises(Refused):
        jobs.enqueue(PLUGIN, payload)
    assert jobs.list_jobs().total == 0
    assert runner.calls == [("admit", PLUGIN)]


def test_the_runner_gets_the_stored_job_and_answers_for_stats_and_nodes(
    elsewhere: tuple[ElsewhereRunner, JobManagementService],
    plugins: PluginManagementService,
    payload: dict,
) -> None:
    runner, jobs = elsewhere
    job, future = jobs.enqueue(PLUGIN, payload, owner="alice")
    # Stored PENDING, with its input, before the runner hears of it.
    assert jobs.get_job(job.id, "alice").status is JobStatus.PENDING
    assert jobs.store.payload(job.id) is not None
    assert runner.calls == [("admit", PLUGIN), ("submit", job.id)]
    assert future is runner.futures[job.id]
    assert jobs.stats() == {"workers": 5, "queue_size": 0, "running": 2, "queued": 3}
    assert [n["name"] for n in jobs.nodes()] == ["w1"]
    assert "plughost_queue_depth 3" in plugins.metrics.render()


def test_a_waited_job_of_a_runner_elsewhere_is_stored_at_once(
    elsewhere: tuple[ElsewhereRunner, JobManagementService], payload: dict
) -> None:
    _, jobs = elsewhere
    job, _ = jobs.run_waited(PLUGIN, payload)
    assert jobs.get_job(job.id).status is JobStatus.PENDING
    assert jobs.record_waited(job.id) is None  # nothing held back in memory


def test_a_quota_refusal_gives_the_admitted_room_back(
    elsewhere: tuple[ElsewhereRunner, JobManagementService], payload: dict
) -> None:
    runner, jobs = elsewhere
    jobs.enqueue(PLUGIN, payload)
    runner.calls.clear()
    with pytest.raises(QuotaExceeded) as refused:
        jobs.enqueue(PLUGIN, payload)
    assert runner.calls == [("admit", PLUGIN), ("withdraw", None)]
    assert refused.value.envelope["error"]["details"]["retry_after_s"] == 7.0


def test_cancel_and_shutdown_go_to_the_runner(
    elsewhere: tuple[ElsewhereRunner, JobManagementService], payload: dict
) -> None:
    runner, jobs = elsewhere
    job, _ = jobs.enqueue(PLUGIN, payload)
    # The runner is the one that stops it: still PENDING in the store here.
    assert jobs.cancel_job(job.id, wait_s=0).status is JobStatus.PENDING
    assert runner.calls[-1] == ("cancel", JobStatus.PENDING)
    jobs.shutdown(timeout_s=3.0)
    assert runner.calls[-1] == ("shutdown", 3.0)


def test_a_job_run_here_is_recorded_as_record_finished_records_it(
    plugins: PluginManagementService, payload: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An envelope without a reason reads as the host's own failure, the
    # same on every path that records a job's end.
    broken = {"error": {"type": "PluginError", "message": "half an envelope", "details": {}}}
    calls_end_with(monkeypatch, ({}, broken))
    jobs = JobManagementService(plugins, MemoryJobStore(), workers=1, queue_size=1)
    try:
        job = jobs.create_job(PLUGIN, payload)
        ran = jobs.run_job(job.id)
        assert ran.status is JobStatus.FAILED
        assert ran.error is not None and ran.error["details"]["reason"] == "internal"
        assert ran.error["type"] == "InternalError"
        assert jobs.get_job(job.id) == ran
        expected = finished_job(jobs.get_job(job.id), ({}, broken))
        assert stored_record(ran) == stored_record(expected)
    finally:
        jobs.shutdown()


@pytest.mark.parametrize(
    ("result", "error", "status"),
    [
        ({"w": 1}, {}, JobStatus.SUCCESS),
        ({}, envelope("cancelled", "stopped", plugin=PLUGIN), JobStatus.CANCELLED),
        ({}, envelope("timeout", "too slow", plugin=PLUGIN), JobStatus.FAILED),
    ],
)
def test_record_finished_sets_status_result_and_public_error(
    result: dict[str, Any], error: dict[str, Any], status: JobStatus
) -> None:
    running = Job(id="j1", plugin=PLUGIN, status=JobStatus.RUNNING, created_at=now_iso(), owner="o")
    written: list[Job] = []
    observed: list[tuple[str, str | None, float]] = []

    def write(job: Job) -> bool:
        written.append(job)
        return True

    final = record_finished(
        running,
        (result, error),
        12.5,
        write,
        observe=lambda *seen: observed.append(seen),
    )
    assert written == [final] and final.status is status and final.finished_at
    assert final.result == (result or None)
    assert final.error == (error["error"] if error else None)
    assert "_internal" not in (final.error or {})
    reason = error["error"]["details"]["reason"] if error else None
    assert observed == [(PLUGIN, reason, 12.5)]


def test_the_local_pool_cancels_a_waiting_job_before_it_runs(
    plugins: PluginManagementService, payload: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    calls_end_with(monkeypatch, ({"ok": True}, {}), gate)
    jobs = JobManagementService(plugins, MemoryJobStore(), workers=1, queue_size=2)
    assert isinstance(jobs.runner, LocalPool)
    try:
        first, first_done = jobs.enqueue(PLUGIN, payload)
        second, second_done = jobs.enqueue(PLUGIN, payload)
        assert jobs.cancel_job(second.id, wait_s=5).status is JobStatus.CANCELLED
        with pytest.raises(JobFinished):
            jobs.cancel_job(second.id)
        gate.set()
        assert first_done.result(timeout=30).status is JobStatus.SUCCESS
        assert second_done.result(timeout=30).status is JobStatus.CANCELLED
        assert jobs.stats() == {"workers": 1, "queue_size": 2, "running": 0, "queued": 0}
    finally:
        gate.set()
        jobs.shutdown()


class _Token:
    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


def _held_pool(gate: threading.Event, ran: list[str]) -> LocalPool:
    """A pool of one worker whose jobs wait for `gate`, each noted in `ran` as it starts."""

    def run(job_id: str, token: Any) -> Any:
        ran.append(job_id)
        assert gate.wait(20)
        return job_id

    return LocalPool(run, lambda _: None, _Token, workers=1, queue_size=2)


@pytest.mark.timeout(30)
def test_stop_starting_twice_at_once_releases_a_dropped_jobs_room_once() -> None:
    # Two calls at once (stop_starting and shutdown's own) both saw the queued
    # job, and future.cancel() is True again on a cancelled future: its slot
    # was released twice, the queue counted -1, and the running job's own
    # release then raised "Semaphore released too many times" into its future.
    gate, ran = threading.Event(), []
    pool = _held_pool(gate, ran)
    try:
        pool.admit(PLUGIN)
        running = pool.submit("running")
        wait_until(lambda: pool.stats()["running"] == 1)
        pool.admit(PLUGIN)
        queued = pool.submit("queued")
        run = pool._futures["queued"]
        cancel, first_in, second_done = run.cancel, threading.Event(), threading.Event()

        def slow_cancel() -> bool:  # the first caller pauses once it cancelled
            cancelled = cancel()
            if not first_in.is_set():
                first_in.set()
                second_done.wait(10)
            return cancelled

        run.cancel = slow_cancel  # type: ignore[method-assign]
        first = threading.Thread(target=pool.stop_starting)
        first.start()
        assert first_in.wait(10)
        second = threading.Thread(target=pool.stop_starting)
        second.start()
        second.join(10)
        second_done.set()
        first.join(10)
        assert pool.stats()["queued"] == 0
        with pytest.raises(ShuttingDown):
            queued.result(timeout=10)
        gate.set()
        assert running.result(timeout=10) == "running"
        assert pool.stats() == {"workers": 1, "queue_size": 2, "running": 0, "queued": 0}
        assert ran == ["running"]
    finally:
        gate.set()
        pool.shutdown(1)


@pytest.mark.timeout(30)
def test_a_job_handed_over_after_stop_starting_never_starts() -> None:
    # Admitted before the shutdown began, submitted after (a /v1/jobs
    # request between its admission and its store insert, or the batch
    # feeder): it waited behind the running job, then ran.
    gate, ran = threading.Event(), []
    pool = _held_pool(gate, ran)
    try:
        pool.admit(PLUGIN)
        running = pool.submit("running")
        wait_until(lambda: pool.stats()["running"] == 1)
        pool.admit(PLUGIN)
        pool.stop_starting()
        late = pool.submit("late")
        with pytest.raises(ShuttingDown):  # answered now, not once the running job ends
            late.result(timeout=2)
        gate.set()
        assert running.result(timeout=10) == "running"
        time.sleep(0.2)
        assert ran == ["running"]
        assert pool.stats() == {"workers": 1, "queue_size": 2, "running": 0, "queued": 0}
    finally:
        gate.set()
        pool.shutdown(1)
