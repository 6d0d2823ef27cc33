"""AnalysisService: what the API calls. It goes through JobManagementService
only, so every analysis is a job with a record, queued in the bounded pool."""

from __future__ import annotations

from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from host.errors import ServiceError, envelope
from host.services.jobs import JobManagementService
from host.services.store import ANONYMOUS, Job

# The longest analyze() waits for its job (queueing included) before it gives
# the job back unfinished; the job itself goes on.
ANALYZE_WAIT_S = 600.0


class AnalysisService:
    def __init__(self, jobs: JobManagementService, default_plugin: str = "image_info") -> None:
        self.jobs = jobs
        self.default_plugin = default_plugin

    def submit(
        self, plugin_name: str | None, payload: Any, owner: str = ANONYMOUS
    ) -> tuple[Job, Future[Job]]:
        """Queue an analysis as a job of `owner`. Raises Rejected, Overloaded or
        QuotaExceeded."""
        return self.jobs.enqueue(plugin_name or self.default_plugin, payload, owner)

    def analyze(
        self, plugin_name: str | None, payload: Any, owner: str = ANONYMOUS
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run an analysis and wait for it: `(result, {})` or `({}, envelope)`."""
        try:
            job, future = self.submit(plugin_name, payload, owner)
        except ServiceError as exc:
            return {}, exc.envelope
        try:
            job = future.result(timeout=ANALYZE_WAIT_S)
        except FutureTimeout:
            return {}, envelope(
                "internal", f"job {job.id} did not finish in time", plugin=job.plugin
            )
        return job_outcome(job)


def job_outcome(job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    """A finished job as `(result, {})` or `({}, {"error": ...})` (no `_internal`)."""
    if job.error:
        return {}, {"error": job.error}
    return job.result or {}, {}
