"""Jobs in PostgreSQL: the store every node of a multi-node deployment shares.

It keeps the contract of every job store (`JobStore`, host/services/jobrows.py)
with the same statements as the SQLite store (host/services/jobsql.py), and
adds what a shared store needs:

    add(job, payload)     the row and its dispatch (`dispatch(conn, job)`, a
                          Procrastinate defer) in ONE transaction: no job is
                          ever accepted but not queued, or queued but not stored;
                          with its owner's quota check (`admit`) in that
                          transaction too, under a lock of the owner's
                          (`OWNER_LOCK`): one quota, however many API nodes
    claim(id, node, ...)  a worker takes the job: attempts + 1, fenced
    finish(job, attempt)  the final result, written only by the attempt that
                          holds the job: a redelivered or stale run cannot
                          write a second one (it is counted in `completions`)
    cancel_pending(id)    PENDING -> CANCELLED; a running job is left to the
                          dispatcher, which asks its node to abort it

Every database failure (server down, connection lost, pool exhausted)
becomes `DatabaseUnavailable`, a ServiceError the API answers with 503 and
Retry-After; the pool reconnects by itself when the server is back.

`recover()` does nothing here: in a shared store no node may declare the
other nodes' jobs dead. Jobs of a node that died are found by the
stalled-job recovery step of the worker nodes (`WorkerNode.recover_once`
in host/cluster/worker.py), which asks `recovery_action` what to do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import psycopg_pool

from host.errors import ServiceError, envelope
from host.services.batchrows import SqlBatchRows
from host.services.jobrows import (
    COLUMNS,
    FINISHED,
    Admit,
    Idempotency,
    Job,
    JobStatus,
    JobStore,
    Keyed,
    add_keyed,
    job_from_row,
    now_iso,
    record_bytes,
    to_json,
)
from host.services.jobsql import Dialect, SqlRows

log = logging.getLogger("plughost.pgstore")

_FINISHED = [s.value for s in FINISHED]
# How long a size figure is trusted: summing every row on each job would cost more than the job.
SIZE_CACHE_S = 10.0
RETRY_AFTER_S = 2.0
RECONNECT_S = 4.0
FAIL_FAST_S = 1.0
NOTIFY_CHANNEL = "plughost_job_finished"
POSTGRES = Dialect(
    table="plughost_jobs",
    mark="%s",
    usage="SELECT COUNT(*), COALESCE(SUM(stored_bytes), 0) FROM plughost_jobs WHERE owner = ?",
    size="SELECT COALESCE(SUM(stored_bytes), 0) FROM plughost_jobs",
)

# The first key of the advisory lock an owner's new jobs are stored under
# (the second is the hash of the owner): "pluq" in ASCII. Two-key advisory
# locks do not share a key space with one-key locks (schema.SCHEMA_LOCK).
OWNER_LOCK = 0x706C7571

# Queues a job inside the connection's transaction, with a priority; the queue's job id.
Dispatch = Callable[[psycopg.Connection[Any], Job, int], int]


class DatabaseUnavailable(ServiceError):
    """The shared database cannot be reached now; retry after a while."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(
            envelope(
                "database_unavailable",
                f"the job database is unreachable ({type(cause).__name__}); retry later",
                retry_after_s=RETRY_AFTER_S,
            )
        )


@dataclass(frozen=True)
class Claim:
    """A worker's hold on a job: run it as `attempt`, or do not run it (`job` None)."""

    job: Job | None
    attempt: int
    exhausted: bool = False


def _hold(
    conn: psycopg.Connection[Any], job_id: str, stalled_after_s: float
) -> tuple[str, int, str | None, bool] | None:
    """Lock the job's row; `(status, attempts, node holding it, that node is
    silent for stalled_after_s or gone)`, or None for no such job."""
    row = conn.execute(
        "SELECT j.status, j.attempts, j.node, "
        "(n.last_heartbeat IS NULL OR n.last_heartbeat < now() - make_interval(secs => %s))"
        " FROM plughost_jobs j LEFT JOIN plughost_nodes n ON n.name = j.node "
        "WHERE j.id = %s FOR UPDATE OF j",
        (stalled_after_s, job_id),
    ).fetchone()
    return None if row is None else (row[0], row[1], row[2], bool(row[3]))


def _lock_owner(conn: psycopg.Connection[Any], owner: str) -> None:
    """Wait for, and hold until `conn`'s transaction ends, the lock of `owner`'s new jobs."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (OWNER_LOCK, owner))


def open_pool(url: str, max_size: int = 8, timeout_s: float = 5.0) -> psycopg_pool.ConnectionPool:
    """A connection pool to `url` that checks connections before lending them
    and waits at most `timeout_s` for one (then: PoolTimeout)."""
    pool = psycopg_pool.ConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        timeout=timeout_s,
        open=False,
        check=psycopg_pool.ConnectionPool.check_connection,
        kwargs={"connect_timeout": max(1, int(timeout_s))},
        # The pool's reconnection backoff doubles without a bound: an attempt
        # given up after a few seconds is started afresh by the next request,
        # so a node is back within seconds of the database, not minutes.
        reconnect_timeout=RECONNECT_S,
    )
    pool.open(wait=False)
    return pool


class PgJobStore(JobStore):
    """Jobs in PostgreSQL tables shared by every node; thread-safe."""

    def __init__(self, pool: psycopg_pool.ConnectionPool, dispatch: Dispatch | None = None) -> None:
        self.pool = pool
        # Called inside add()'s transaction; set by whoever owns the queue.
        self.dispatch = dispatch
        self._size_lock = threading.Lock()
        self._size: tuple[float, int] = (-SIZE_CACHE_S, 0)
        self._down_until = 0.0

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a transaction (committed on exit).

        Raises DatabaseUnavailable when the database cannot be reached; for
        FAIL_FAST_S after that without waiting for the pool again, so a
        request during an outage gets its 503 at once.
        """
        if time.monotonic() < self._down_until:
            raise DatabaseUnavailable(psycopg_pool.PoolTimeout("the database was just unreachable"))
        try:
            with self.pool.connection() as conn, conn.transaction():
                yield conn
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            self._down_until = time.monotonic() + FAIL_FAST_S
            raise DatabaseUnavailable(exc) from exc

    @contextmanager
    def _rows(self) -> Iterator[SqlRows]:
        with self.connection() as conn:
            yield SqlRows(conn, POSTGRES)

    def add(
        self,
        job: Job,
        payload: dict[str, Any] | None,
        idem: Idempotency | None = None,
        admit: Admit | None = None,
    ) -> Keyed | None:
        """Store the job and, if it is PENDING, queue it: in one transaction.
        A job its owner stored under `idem`'s key already is returned instead
        (nothing stored or queued); a racing insert of the same key waits for
        the other transaction, then finds its job.

        With `admit` (the owner's quota), the transaction first takes the
        owner's advisory lock, held until it commits: the quota's reads (each
        statement sees what was committed before it, READ COMMITTED), its
        pruning and the insert are one step for every API node."""
        with self.connection() as conn:
            rows = SqlRows(conn, POSTGRES)
            if admit is not None:
                _lock_owner(conn, job.owner)
                admit(rows)
            held = add_keyed(rows, job, payload, idem)
            if held is not None:
                return held
            if job.status is JobStatus.PENDING:
                self._queue(conn, job, 0)
        return None

    def _queue(self, conn: psycopg.Connection[Any], job: Job, priority: int) -> None:
        if self.dispatch is not None:
            queue_job = self.dispatch(conn, job, priority)
            conn.execute(
                "UPDATE plughost_jobs SET queue_job_id = %s WHERE id = %s", (queue_job, job.id)
            )

    @contextmanager
    def batch_rows(self) -> Iterator[SqlBatchRows]:
        """The batches (host/services/batchrows.py) in one transaction; a new
        batch's items are queued in it, item i with priority -(i + the jobs
        its owner has PENDING)."""
        with self.connection() as conn:
            yield SqlBatchRows(
                conn,
                POSTGRES,
                "plughost_batches",
                queue=lambda job, priority: self._queue(conn, job, priority),
                hold=lambda owner: _lock_owner(conn, owner),
            )

    def size_bytes(self) -> int:
        """Bytes the jobs store (inputs, results, errors), at most SIZE_CACHE_S old."""
        with self._size_lock:
            read_at, size = self._size
            if time.monotonic() - read_at < SIZE_CACHE_S:
                return size
        size = super().size_bytes()
        with self._size_lock:
            self._size = (time.monotonic(), size)
        return size

    def _reclaim(self) -> None:
        # The space is the server's (autovacuum's); the size read next is fresh.
        with self._size_lock:
            self._size = (-SIZE_CACHE_S, 0)

    def recover(self, reason: dict[str, Any]) -> int:
        """Nothing: see the module docstring."""
        return 0

    def close(self) -> None:
        """The pool belongs to whoever opened it; nothing to release here."""

    # -- what a shared store adds -------------------------------------------

    def claim(self, job_id: str, node: str, stalled_after_s: float, max_attempts: int) -> Claim:
        """Take `job_id` for `node` as its next attempt.

        A PENDING job is taken; a RUNNING one only when the node holding it
        has not sent a heartbeat for `stalled_after_s` (its run is lost). A
        job past `max_attempts` ends INTERRUPTED here instead (`exhausted`).
        Anything else (finished, or running on a live node) is not taken:
        `job` is None, and the caller must not run it.
        """
        with self.connection() as conn:
            row = _hold(conn, job_id, stalled_after_s)
            if row is None:
                return Claim(None, 0)
            status, attempts, holder, holder_dead = row
            if status == JobStatus.RUNNING.value and (holder == node or not holder_dead):
                return Claim(None, attempts)
            if status not in (JobStatus.PENDING.value, JobStatus.RUNNING.value):
                return Claim(None, attempts)
            if attempts >= max_attempts:
                self._interrupt(conn, job_id, attempts, holder)
                return Claim(None, attempts, exhausted=True)
            found = conn.execute(
                "UPDATE plughost_jobs SET status = 'RUNNING', attempts = attempts + 1, "
                "node = %s, started_at = %s WHERE id = %s "
                f"RETURNING {COLUMNS}, attempts",
                (node, now_iso(), job_id),
            ).fetchone()
        assert found is not None
        return Claim(job_from_row(found), int(found[10]))

    def _interrupt(
        self, conn: psycopg.Connection[Any], job_id: str, attempts: int, node: str | None
    ) -> None:
        error = envelope(
            "interrupted",
            f"the node running this job stopped; gave up after {attempts} attempts",
            attempts=attempts,
            last_node=node,
        )["error"]
        conn.execute(
            "UPDATE plughost_jobs SET status = 'INTERRUPTED', finished_at = %s, error = %s, "
            "payload = NULL, image = NULL, stored_bytes = LENGTH(%s) WHERE id = %s",
            (now_iso(), to_json(error), to_json(error), job_id),
        )
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, job_id))

    def recovery_action(
        self, conn: psycopg.Connection[Any], job_id: str, max_attempts: int, stalled_after_s: float
    ) -> str:
        """Inside `conn`'s transaction: what to do with the job `job_id`,
        whose queue worker stopped sending heartbeats. One of:

        - "done": the job is finished (or gone); its queue entry can be closed
        - "busy": a live node still holds it (its queue worker restarted,
          the node did not); leave it, the node writes the result
        - "interrupted": its node is dead and it used `max_attempts`; it is
          ended INTERRUPTED here
        - "retry": it goes back on its queue, for the next node to claim
        """
        row = _hold(conn, job_id, stalled_after_s)
        if row is None or row[0] in _FINISHED:
            return "done"
        status, attempts, holder, holder_dead = row
        if status == JobStatus.RUNNING.value and not holder_dead:
            return "busy"
        if status == JobStatus.RUNNING.value and attempts >= max_attempts:
            self._interrupt(conn, job_id, attempts, holder)
            return "interrupted"
        return "retry"

    def finish(self, job: Job, attempt: int) -> bool:
        """Write the final state of `job` if `attempt` still holds it; return
        True if written. A run that lost its hold is counted, not written."""
        result, error = to_json(job.result), to_json(job.error)
        with self.connection() as conn:
            cursor = conn.execute(
                "UPDATE plughost_jobs SET status = %s, finished_at = %s, result = %s, "
                "error = %s, payload = NULL, image = NULL, stored_bytes = %s, "
                "completions = completions + 1 "
                "WHERE id = %s AND status = 'RUNNING' AND attempts = %s",
                (
                    job.status.value,
                    job.finished_at,
                    result,
                    error,
                    record_bytes(result, error),
                    job.id,
                    attempt,
                ),
            )
            if cursor.rowcount:
                conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, job.id))
                return True
            conn.execute(
                "UPDATE plughost_jobs SET completions = completions + 1 WHERE id = %s", (job.id,)
            )
        return False

    def cancel_pending(self, job_id: str, error: dict[str, Any]) -> tuple[str, int | None]:
        """CANCELLED if still PENDING. Returns `(status now, queue job id)`."""
        with self.connection() as conn:
            row = conn.execute(
                "UPDATE plughost_jobs SET status = CASE WHEN status = 'PENDING' "
                "THEN 'CANCELLED' ELSE status END, "
                "finished_at = CASE WHEN status = 'PENDING' THEN %s ELSE finished_at END, "
                "error = CASE WHEN status = 'PENDING' THEN %s ELSE error END, "
                "payload = CASE WHEN status = 'PENDING' THEN NULL ELSE payload END, "
                "image = CASE WHEN status = 'PENDING' THEN NULL ELSE image END "
                "WHERE id = %s RETURNING status, queue_job_id",
                (now_iso(), to_json(error), job_id),
            ).fetchone()
            if row is not None and row[0] == JobStatus.CANCELLED.value:
                conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, job_id))
        return ("", None) if row is None else (row[0], row[1])

    def finished_among(self, job_ids: list[str]) -> list[Job]:
        """The finished jobs among `job_ids`."""
        with self.connection() as conn:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM plughost_jobs WHERE id = ANY(%s) AND status = ANY(%s)",
                (job_ids, _FINISHED),
            ).fetchall()
        return [job_from_row(r) for r in rows]

    def counts(self) -> dict[str, float]:
        """`pending`, `running` and `oldest_pending_s` (0 when none waits)."""
        with self.connection() as conn:
            row = conn.execute(
                "SELECT COUNT(*) FILTER (WHERE status = 'PENDING'), "
                "COUNT(*) FILTER (WHERE status = 'RUNNING'), "
                "MIN(created_at) FILTER (WHERE status = 'PENDING') "
                "FROM plughost_jobs WHERE status IN ('PENDING', 'RUNNING')"
            ).fetchone()
        assert row is not None
        oldest = 0.0
        if row[2] is not None:
            oldest = max(0.0, (datetime.now(UTC) - datetime.fromisoformat(row[2])).total_seconds())
        return {"pending": int(row[0]), "running": int(row[1]), "oldest_pending_s": oldest}
