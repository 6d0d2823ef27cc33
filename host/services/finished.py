"""How a job's end is recorded: once, the same way wherever it ran.

    a call's (result, error envelope)             the job, RUNNING until now
                 \\                                 /
                  record_finished(job, outcome, elapsed_ms, write)
                    |  status: SUCCESS, CANCELLED (a cancelled call), INTERRUPTED
                    |  (a call its host's shutdown killed) or FAILED
                    |  result, or the envelope's public part; finished_at
                    |  write(job): the store it ran for (False: not written)
                    |  observe(plugin, reason, elapsed_ms): metrics, if asked
                    v
                 "job finished" logged; ended(job), if asked and written (the
                 end of its batch: host/services/batchrows.py `job_ended`);
                 the finished job returned

A job run on this node (`JobManagementService.run_job`) and one run on a
worker node of a multi-node deployment (`WorkerNode.handle`) both end here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from host.errors import Envelope, envelope
from host.services.store import Job, JobStatus, now_iso

log = logging.getLogger("plughost.jobs")

Outcome = tuple[dict[str, Any], dict[str, Any]]
"""A call's `(result, {})` or `({}, error envelope)`."""


def input_gone(plugin: str) -> Outcome:
    """The outcome of a job whose stored input is missing: the host's own failure."""
    return {}, envelope("internal", "the job's input is gone", plugin)


def finished_job(job: Job, outcome: Outcome) -> Job:
    """`job` as it ends with `outcome`: its status, its result or the public
    part of its error (no `_internal`), and the time it finished."""
    result, error = outcome
    failure = Envelope.of(error) if error else None
    if failure is None:
        status = JobStatus.SUCCESS
    elif failure.reason == "cancelled":
        status = JobStatus.CANCELLED
    elif failure.reason == "interrupted":  # killed by its host's shutdown
        status = JobStatus.INTERRUPTED
    else:
        status = JobStatus.FAILED
    return replace(
        job,
        status=status,
        finished_at=now_iso(),
        result=result or None,
        error=failure.public() if failure else None,
    )


def record_finished(
    job: Job,
    outcome: Outcome,
    elapsed_ms: float,
    write: Callable[[Job], bool],
    observe: Callable[[str, str | None, float], None] | None = None,
    logger: logging.Logger = log,
    ended: Callable[[Job], object] | None = None,
    **context: Any,
) -> Job:
    """Record the end of `job` with its call's `outcome` (see `finished_job`).

    `write` stores the finished job and says whether it did (a worker node
    whose attempt lost its hold on the job writes nothing); `observe`, when
    given, counts the call as `(plugin, reason or None, elapsed_ms)`. The
    end is logged to `logger` with `context` (say, the attempt); `ended`,
    when given, is called with the job once it is written. Returns the
    finished job.
    """
    final = finished_job(job, outcome)
    reason = Envelope.of(final.error).reason if final.error else None
    written = write(final)
    if observe is not None:
        observe(final.plugin, reason, elapsed_ms)
    logger.info(
        "job finished" if written else "job result discarded: another attempt holds it",
        extra={
            "job_id": final.id,
            "plugin": final.plugin,
            "status": final.status.value,
            "reason": reason,
            "elapsed_ms": round(elapsed_ms, 1),
            **context,
        },
    )
    if written and ended is not None:
        ended(final)
    return final
