"""Recovery of the jobs of dead nodes: an explicit periodic step every worker
node runs, not an accident of the broker.

    get_stalled_jobs (Procrastinate: entries 'doing' under a worker whose
      |               heartbeat lapsed)
      v  for each entry, ONE transaction:
    lock the queue entry; still 'doing' under the same worker? (else another
      |   node handled it since the list was read: skip)
    lock the job row; decide (PgJobStore.recovery_action):
      done        -> close the entry
      busy        -> leave it (a live node still runs the job)
      interrupted -> close the entry as failed (the job row says why)
      retry       -> the entry back on its queue

Deciding and acting in the transaction that holds both rows keeps two
nodes recovering at once from acting twice on one entry.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from procrastinate import sql
from procrastinate.jobs import Job as QueuedJob

from host.cluster.pgstore import PgJobStore
from host.services.batchrows import job_ended

log = logging.getLogger("plughost.recovery")


def _act(conn: psycopg.Connection[Any], entry: int, action: str) -> None:
    if action == "retry":
        conn.execute(
            sql.queries["retry_job"],
            {
                "job_id": entry,
                "retry_at": None,
                "new_priority": None,
                "new_queue_name": None,
                "new_lock": None,
            },
        )
    elif action in ("done", "interrupted"):
        status = "succeeded" if action == "done" else "failed"
        conn.execute(
            sql.queries["finish_job"],
            {"job_id": entry, "status": status, "delete_job": action == "done"},
        )


def recover_entry(
    store: PgJobStore, queued: QueuedJob, max_attempts: int, stalled_after_s: float
) -> str:
    """Handle one stalled queue entry; return the action taken ("skipped"
    when another node handled it first)."""
    with store.connection() as conn:
        current = conn.execute(
            "SELECT status, worker_id FROM procrastinate_jobs WHERE id = %s FOR UPDATE",
            (queued.id,),
        ).fetchone()
        if current is None or current[0] != "doing" or current[1] != queued.worker_id:
            return "skipped"
        job_id = str(queued.task_kwargs["job_id"])
        action = store.recovery_action(conn, job_id, max_attempts, stalled_after_s)
        assert queued.id is not None
        _act(conn, queued.id, action)
    if action != "busy":
        log.warning("stalled job: %s", action, extra={"job_id": job_id, "entry": queued.id})
    if action == "interrupted":
        job_ended(store, job_id)  # it may be the last item of a batch
    return action
