"""AnalysisService: what the API calls. It goes through JobManagementService
only, so every analysis is a job with a record, queued in the bounded pool.
A job whose caller waits for it (`POST /v1/analyze`) is recorded once, as it
ends, or as its caller stops waiting (`JobManagementService.run_waited`)."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from host.services.jobs import JobManagementService
from host.services.store import ANONYMOUS, Job

# The longest `POST /v1/analyze` waits for its job (queueing included) before
# it answers 202 with the job unfinished; the job itself goes on.
ANALYZE_WAIT_S = 600.0


class AnalysisService:
    def __init__(self, jobs: JobManagementService, default_plugin: str = "image_info") -> None:
        self.jobs = jobs
        self.default_plugin = default_plugin

    def submit(
        self,
        plugin_name: str | None,
        payload: Any,
        owner: str = ANONYMOUS,
        waited: bool = False,
        key: str | None = None,
        callback_url: str | None = None,
    ) -> tuple[Job, Future[Job]]:
        """Queue an analysis as a job of `owner`; `waited`: the caller waits
        for its end (stored once, as it ends, unless `stop_waiting`). With
        an idempotency `key` the owner used before, the job of that key
        and a future of its end. With a `callback_url` (not for a `waited`
        one), the job's public view is POSTed there when it ends. Raises
        Rejected (a refused callback destination too), Overloaded, QuotaExceeded or
        IdempotencyConflict."""
        name = plugin_name or self.default_plugin
        if waited:
            return self.jobs.run_waited(name, payload, owner, key)
        return self.jobs.enqueue(name, payload, owner, key, callback_url)

    def stop_waiting(self, job: Job) -> Job:
        """The caller of a `waited` analysis answers before its end: the job
        as stored now, from which it can be followed like any other."""
        return self.jobs.record_waited(job.id) or self.jobs.get_job(job.id)


def job_outcome(job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    """A finished job as `(result, {})` or `({}, {"error": ...})` (no `_internal`)."""
    if job.error:
        return {}, {"error": job.error}
    return job.result or {}, {}
