"""JobManagementService: job records and the bounded pool that runs them.

    enqueue(plugin, payload)
      |  PluginManagementService.check (refuse bad input, unknown, quarantined)
      |  take a pool slot, or raise Overloaded (503 + Retry-After)
      |  store the job PENDING (committed before anyone hears of it)
      v
    pool thread: run_job(id) -> RUNNING -> PluginManagementService.execute_plugin
      -> SUCCESS | FAILED | CANCELLED, result or public error stored, input dropped

At most `workers` sandboxes run at once and at most `queue_size` jobs wait;
nothing piles up beyond that. The only execution path is
`PluginManagementService.execute_plugin`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from host.errors import JobFinished, JobNotFound, Overloaded, envelope
from host.services.plugins import PluginManagementService
from host.services.store import FINISHED, Job, JobStatus, JobStore, MemoryJobStore, now_iso

log = logging.getLogger("plughost.jobs")
PRUNE_EVERY_S = 60.0


class JobManagementService:
    """Creates, runs, lists and cancels jobs; thread-safe."""

    def __init__(
        self,
        plugins: PluginManagementService,
        store: JobStore | None = None,
        workers: int = 2,
        queue_size: int = 32,
        retention_s: float = 7 * 24 * 3600,
    ) -> None:
        self._plugins = plugins
        self.store: JobStore = store or MemoryJobStore()
        self.workers = workers
        self.queue_size = queue_size
        self.retention_s = retention_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="plughost-job")
        self._slots = threading.BoundedSemaphore(workers + queue_size)
        self._lock = threading.Lock()
        self._tokens: dict[str, Any] = {}
        self._running = 0
        self._in_flight = 0
        self._last_prune = 0.0
        self._closed = False
        plugins.metrics.gauge(
            "plughost_queue_depth", "Jobs waiting for a sandbox.", lambda: self.stats()["queued"]
        )
        plugins.metrics.gauge(
            "plughost_sandboxes_running", "Sandboxes running now.", lambda: self.stats()["running"]
        )
        recovered = self.store.recover(
            envelope("interrupted", "the host stopped before this job finished")["error"]
        )
        if recovered:
            log.warning("marked %d unfinished jobs of a previous run INTERRUPTED", recovered)

    # -- creating -----------------------------------------------------------

    def create_job(self, plugin_name: str, payload: Any) -> Job:
        """Validate and store a PENDING job. Raises Rejected."""
        self._plugins.check(plugin_name, payload)
        return self._store_pending(plugin_name, payload)

    def _store_pending(self, plugin_name: str, payload: Any) -> Job:
        job = Job(
            id=uuid.uuid4().hex,
            plugin=plugin_name,
            status=JobStatus.PENDING,
            created_at=now_iso(),
            payload=payload,
        )
        self.store.add(job)
        log.info("job accepted", extra={"job_id": job.id, "plugin": plugin_name})
        return job

    def enqueue(self, plugin_name: str, payload: Any) -> tuple[Job, Future[Job]]:
        """Create a job and queue it. Raises Rejected or Overloaded; stores nothing then."""
        self._plugins.check(plugin_name, payload)
        if self._closed or not self._slots.acquire(blocking=False):
            raise Overloaded(retry_after_s=self._retry_after())
        try:
            job = self._store_pending(plugin_name, payload)  # checked above
            token = self._plugins.cancellation()
            with self._lock:
                self._tokens[job.id] = token
                self._in_flight += 1
            future = self._pool.submit(self._run_pooled, job.id, token)
        except BaseException:
            self._slots.release()
            raise
        self._maybe_prune()
        return job, future

    def _retry_after(self) -> float:
        # A rough wait: one typical call per queued job per worker.
        return max(1.0, round(self.queue_size / max(self.workers, 1), 1))

    # -- running ------------------------------------------------------------

    def _run_pooled(self, job_id: str, token: Any) -> Job:
        try:
            return self.run_job(job_id, token)
        finally:
            with self._lock:
                self._tokens.pop(job_id, None)
                self._in_flight -= 1
            token.close()
            self._slots.release()

    def run_job(self, job_id: str, cancel: Any = None) -> Job:
        """Run a PENDING job in this thread; return it finished. Raises JobNotFound."""
        with self._lock:
            job = self.get_job(job_id)
            if job.status is not JobStatus.PENDING:
                return job  # cancelled while queued, or run already
            job = replace(job, status=JobStatus.RUNNING, started_at=now_iso())
            self.store.update(job)
            self._running += 1
        context = {"job_id": job.id, "plugin": job.plugin}
        log.info("job started", extra=context)
        started = time.monotonic()
        try:
            result, error = self._plugins.execute_plugin(job.plugin, job.payload, cancel=cancel)
        finally:
            with self._lock:
                self._running -= 1
        reason = error["error"]["details"]["reason"] if error else None
        if not error:
            status = JobStatus.SUCCESS
        elif reason == "cancelled":
            status = JobStatus.CANCELLED
        else:
            status = JobStatus.FAILED
        job = replace(
            job,
            status=status,
            finished_at=now_iso(),
            result=result or None,
            error=error["error"] if error else None,
            payload=None,
        )
        self.store.update(job)
        log.info(
            "job finished",
            extra={
                **context,
                "status": status.value,
                "reason": reason,
                "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
        return job

    # -- reading and cancelling ---------------------------------------------

    def get_job(self, job_id: str) -> Job:
        """The job with that id. Raises JobNotFound."""
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def list_jobs(
        self,
        status: JobStatus | None = None,
        plugin: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Job], int]:
        """A page of jobs, newest first, and the total that match."""
        return self.store.list(status, plugin, limit, offset)

    def cancel_job(self, job_id: str, wait_s: float = 5.0) -> Job:
        """Cancel a pending job, or kill the sandbox of a running one.

        Returns the job, CANCELLED once the sandbox is gone (or still RUNNING
        if it did not stop within `wait_s`). Raises JobNotFound, JobFinished.
        """
        with self._lock:
            job = self.get_job(job_id)
            if job.status in FINISHED:
                raise JobFinished(job_id, job.status.value)
            token = self._tokens.get(job_id)
            if job.status is JobStatus.PENDING:
                job = replace(
                    job,
                    status=JobStatus.CANCELLED,
                    finished_at=now_iso(),
                    error=envelope(
                        "cancelled", "job was cancelled before it ran", plugin=job.plugin
                    )["error"],
                    payload=None,
                )
                self.store.update(job)
        if token is not None:
            token.cancel()
        log.info("job cancel requested", extra={"job_id": job_id, "plugin": job.plugin})
        deadline = time.monotonic() + wait_s
        while job.status not in FINISHED and time.monotonic() < deadline:
            time.sleep(0.01)  # the worker thread records the outcome
            job = self.get_job(job_id)
        return job

    # -- housekeeping -------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "workers": self.workers,
                "queue_size": self.queue_size,
                "running": self._running,
                "queued": self._in_flight - self._running,
            }

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = now
        pruned = self.store.prune(self.retention_s)
        if pruned:
            log.info("pruned %d finished jobs older than %.0f s", pruned, self.retention_s)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop taking jobs; let running ones finish within `timeout_s`, then cancel.

        Jobs still pending or running afterwards are marked INTERRUPTED.
        """
        self._closed = True
        with self._lock:
            tokens = dict(self._tokens)
        deadline = time.monotonic() + timeout_s
        for job_id in tokens:
            job = self.store.get(job_id)
            if job is not None and job.status is JobStatus.PENDING:
                self.cancel_job(job_id, wait_s=0)
        while self.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        for token in tokens.values():
            token.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.store.recover(
            envelope("interrupted", "the host shut down before this job finished")["error"]
        )
        self.store.close()
