"""Batches in the job stores: a batch row, and its items as ordinary job rows.

    Batch(id, owner, plugin, created_at, job_ids, finished_at)
      │  batches table: one row per batch, its items' job ids in order, an
      │  idempotency key (one batch per (owner, key), by a unique index)
      ▼
    jobs table: each item a job row like any other, with `batch_id` set; the
      first item holds the batch's idempotency key too, so that one key
      stands for one request whichever route (/v1/jobs, /v1/batches) took it

    BatchRows (held with the store's job rows, in ONE transaction or lock)
      ── insert (False on a held key), keyed      ──▶ a new batch, all or nothing
      ── batch, counts, newest, count             ──▶ what GET /v1/batches shows
      ── batch_of, end                            ──▶ batch_ended / job_ended

Every store answers the same questions: the memory store from dicts
(`MemoryBatchRows`), SQLite and PostgreSQL with one set of statements
(`SqlBatchRows`). A store that keeps batches has `batch_rows()`.

The end of a batch is decided by the store, once: `end` sets the batch's
`finished_at` only while it is unset and no item is PENDING or RUNNING, in
one conditional UPDATE, so of two nodes ending the last two items at once
exactly one sees it succeed (`batch_ended`). `job_ended(store, job id)` is
what a job's end calls (host/services/finished.py `record_finished`, and a
cancel): it logs "batch finished" once per batch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from host.errors import IdempotencyConflict
from host.services.jobrows import FINISHED, Idempotency, Job, JobStatus, Rows, now_iso
from host.services.jobsql import Connection, Dialect, SqlRows

log = logging.getLogger("plughost.batches")

# A batch held by an idempotency key, and the digest of the request that created it.
KeyedBatch = tuple["Batch", str]
# Puts a stored PENDING job on its queue, with a priority (PostgreSQL: Procrastinate).
Queue = Callable[[Job, int], None]
# Takes, until the transaction ends, the hold on an owner's new jobs.
HoldOwner = Callable[[str], None]
UNFINISHED_SQL = f"'{JobStatus.PENDING.value}', '{JobStatus.RUNNING.value}'"
BATCH_COLUMNS = "id, owner, plugin, created_at, job_ids, finished_at"


@dataclass(frozen=True)
class Batch:
    """One batch: its items are the jobs `job_ids`, in the order submitted."""

    id: str
    owner: str
    plugin: str
    created_at: str
    job_ids: tuple[str, ...]
    finished_at: str | None = None


def batch_status(batch: Batch, counts: dict[str, int]) -> str:
    """PENDING (no item started), RUNNING, or FINISHED (no item left to run)."""
    unfinished = counts.get(JobStatus.PENDING.value, 0) + counts.get(JobStatus.RUNNING.value, 0)
    if batch.finished_at is not None or unfinished == 0:
        return "FINISHED"
    if counts.get(JobStatus.PENDING.value, 0) == len(batch.job_ids):
        return "PENDING"
    return "RUNNING"


def _batch_from_row(row: Sequence[Any]) -> Batch:
    return Batch(row[0], row[1], row[2], row[3], tuple(json.loads(row[4])), row[5])


class BatchRows(Protocol):
    """A store's batches, held with its job rows (`jobs`) for one operation."""

    @property
    def jobs(self) -> Rows: ...

    def hold_owner(self, owner: str) -> None:
        """Hold the admission of `owner`'s new jobs until these rows are let
        go (the quota read next, and the insert, are then one step on every
        node; a store held by one process's lock holds it already)."""

    def insert(
        self, batch: Batch, items: Sequence[tuple[Job, dict[str, Any]]], idem: Idempotency | None
    ) -> bool:
        """Store the batch and its items (PENDING jobs with their inputs);
        False, storing nothing, when its owner holds a batch under `idem`'s
        key. Raises IdempotencyConflict, storing nothing, when a job of its
        own (POST /v1/jobs) holds that key."""

    def keyed(self, owner: str, key: str) -> KeyedBatch | None: ...

    def batch(self, batch_id: str) -> Batch | None: ...

    def counts(self, batch_id: str) -> dict[str, int]:
        """Its items' jobs per status (items pruned since are not counted)."""

    def count(self, owner: str | None) -> int: ...

    def newest(self, owner: str | None, limit: int, offset: int) -> list[Batch]:
        """`owner`'s batches (None: everyone's), newest first, from `offset`."""

    def batch_of(self, job_id: str) -> str | None:
        """The batch the job is an item of; None for a job of its own."""

    def end(self, batch_id: str, at: str) -> bool:
        """Set the batch's finished_at to `at` if it is unset and none of its
        items is PENDING or RUNNING; True if this call set it."""

    def unended(self) -> list[str]:
        """Ids of the batches whose finished_at is unset."""

    def prune(self, cutoff: str) -> int:
        """Delete the batches that ended before `cutoff` and have no item
        left (their jobs were pruned); return how many went."""


@runtime_checkable
class BatchStore(Protocol):
    """A job store that keeps batches."""

    def batch_rows(self) -> AbstractContextManager[BatchRows]:
        """Its batch rows and job rows, held (one lock, one transaction) until exit."""


def rows_of(store: object) -> AbstractContextManager[BatchRows]:
    """`store.batch_rows()`; raises TypeError for a store without batches."""
    if not isinstance(store, BatchStore):
        raise TypeError(f"{type(store).__name__} keeps no batches")
    return store.batch_rows()


def batch_ended(store: object, batch_id: str) -> bool:
    """True once, for the one caller that finds `batch_id`'s last item
    ended (the store decides: see `BatchRows.end`); it logs "batch finished".
    The place a later feature hooks on the end of a batch."""
    with rows_of(store) as rows:
        ended = rows.end(batch_id, now_iso())
        counts = rows.counts(batch_id) if ended else {}
    if ended:
        log.info("batch finished", extra={"batch_id": batch_id, "counts": counts})
    return ended


def job_ended(store: object, job_id: str) -> bool:
    """Called when a job ends (however it ends): if it is the last item of
    its batch to end, the batch ends (`batch_ended`). False for a job of
    its own, or a store without batches."""
    if not isinstance(store, BatchStore):
        return False
    with store.batch_rows() as rows:
        batch_id = rows.batch_of(job_id)
    return batch_id is not None and batch_ended(store, batch_id)


# -- SQLite and PostgreSQL ---------------------------------------------------


def batch_schema(jobs: str, batches: str) -> str:
    """The batches table and its indexes, beside the jobs table `jobs`
    (whose `batch_id` column the store adds). Statements separated by ';'."""
    return f"""
CREATE TABLE IF NOT EXISTS {batches} (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, plugin TEXT NOT NULL, created_at TEXT NOT NULL,
    job_ids TEXT NOT NULL, finished_at TEXT, item_count INTEGER NOT NULL,
    idem_key TEXT, request_hash TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS {batches}_idem ON {batches} (owner, idem_key)
    WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS {batches}_owner ON {batches} (owner, created_at);
CREATE INDEX IF NOT EXISTS {jobs}_batch ON {jobs} (batch_id, status)
    WHERE batch_id IS NOT NULL"""


class SqlBatchRows:
    """`BatchRows` in `dialect` over `conn` (in a transaction its holder
    commits), the batches in table `batches`; `queue`, if given, queues
    each new item: item i at priority -(p + i), p the number of jobs its
    owner has PENDING already, so that clients take turns on the worker
    nodes (a client's tenth batch does not go ahead of another's first);
    `hold`, if given, takes the hold on an owner's new jobs (`hold_owner`)."""

    def __init__(
        self,
        conn: Connection,
        dialect: Dialect,
        batches: str,
        queue: Queue | None = None,
        hold: HoldOwner | None = None,
    ) -> None:
        self._conn = conn
        self._hold = hold
        self._mark = dialect.mark
        self._jobs_table = dialect.table
        self._table = batches
        self._queue = queue
        self._jobs = SqlRows(conn, dialect)

    @property
    def jobs(self) -> Rows:
        return self._jobs

    def hold_owner(self, owner: str) -> None:
        if self._hold is not None:
            self._hold(owner)

    def _run(self, statement: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.execute(statement.replace("?", self._mark), params)

    def insert(
        self, batch: Batch, items: Sequence[tuple[Job, dict[str, Any]]], idem: Idempotency | None
    ) -> bool:
        held = " ON CONFLICT DO NOTHING" if idem is not None else ""
        cursor = self._run(
            f"INSERT INTO {self._table} ({BATCH_COLUMNS}, item_count, idem_key, request_hash) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?){held}",
            (
                batch.id,
                batch.owner,
                batch.plugin,
                batch.created_at,
                json.dumps(batch.job_ids),
                batch.finished_at,
                len(batch.job_ids),
                None if idem is None else idem.key,
                None if idem is None else idem.digest,
            ),
        )
        if cursor.rowcount != 1:
            return False
        waiting = self._pending(batch.owner) if self._queue is not None else 0
        for index, (job, payload) in enumerate(items):
            if not self._jobs.insert(job, payload, idem if index == 0 else None):
                assert idem is not None  # only a held key refuses an insert
                raise _held_by_job(self._jobs, batch.owner, idem)  # its holder rolls back
            self._run(
                f"UPDATE {self._jobs_table} SET batch_id = ? WHERE id = ?", (batch.id, job.id)
            )
        if self._queue is not None:
            for index, (job, _) in enumerate(items):
                self._queue(job, -(waiting + index))
        return True

    def _pending(self, owner: str) -> int:
        """How many jobs `owner` has PENDING."""
        row = self._run(
            f"SELECT COUNT(*) FROM {self._jobs_table} WHERE owner = ? AND status = ?",
            (owner, JobStatus.PENDING.value),
        ).fetchone()
        return int(row[0])

    def keyed(self, owner: str, key: str) -> KeyedBatch | None:
        row = self._run(
            f"SELECT {BATCH_COLUMNS}, request_hash FROM {self._table} "
            "WHERE owner = ? AND idem_key = ?",
            (owner, key),
        ).fetchone()
        return None if row is None else (_batch_from_row(row), row[6])

    def batch(self, batch_id: str) -> Batch | None:
        row = self._run(
            f"SELECT {BATCH_COLUMNS} FROM {self._table} WHERE id = ?", (batch_id,)
        ).fetchone()
        return None if row is None else _batch_from_row(row)

    def counts(self, batch_id: str) -> dict[str, int]:
        cursor = self._run(
            f"SELECT status, COUNT(*) FROM {self._jobs_table} WHERE batch_id = ? GROUP BY status",
            (batch_id,),
        )
        return {str(status): int(count) for status, count in cursor}

    def count(self, owner: str | None) -> int:
        mine, args = ("WHERE owner = ?", (owner,)) if owner is not None else ("", ())
        return int(self._run(f"SELECT COUNT(*) FROM {self._table} {mine}", args).fetchone()[0])

    def newest(self, owner: str | None, limit: int, offset: int) -> list[Batch]:
        mine, args = ("WHERE owner = ?", [owner]) if owner is not None else ("", [])
        cursor = self._run(
            f"SELECT {BATCH_COLUMNS} FROM {self._table} {mine} "
            "ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        return [_batch_from_row(row) for row in cursor]

    def batch_of(self, job_id: str) -> str | None:
        row = self._run(
            f"SELECT batch_id FROM {self._jobs_table} WHERE id = ?", (job_id,)
        ).fetchone()
        return None if row is None else row[0]

    def end(self, batch_id: str, at: str) -> bool:
        cursor = self._run(
            f"UPDATE {self._table} SET finished_at = ? WHERE id = ? AND finished_at IS NULL "
            f"AND NOT EXISTS (SELECT 1 FROM {self._jobs_table} "
            f"WHERE batch_id = ? AND status IN ({UNFINISHED_SQL}))",
            (at, batch_id, batch_id),
        )
        return bool(cursor.rowcount == 1)

    def unended(self) -> list[str]:
        cursor = self._run(f"SELECT id FROM {self._table} WHERE finished_at IS NULL")
        return [row[0] for row in cursor]

    def prune(self, cutoff: str) -> int:
        cursor = self._run(
            f"DELETE FROM {self._table} WHERE finished_at < ? AND NOT EXISTS "
            f"(SELECT 1 FROM {self._jobs_table} WHERE batch_id = {self._table}.id)",
            (cutoff,),
        )
        return int(cursor.rowcount)


def _held_by_job(jobs: Rows, owner: str, idem: Idempotency) -> IdempotencyConflict:
    """The refusal of a batch whose key `owner` holds for a job of its own."""
    held = jobs.keyed(owner, idem.key)
    return IdempotencyConflict(idem.key, held[0].id if held is not None else "")


# -- memory ------------------------------------------------------------------


class MemoryBatches:
    """What a `MemoryJobStore` keeps of its batches, beside its job rows."""

    def __init__(self) -> None:
        self.batches: dict[str, tuple[Batch, str | None]] = {}  # id: (batch, digest)
        self.keys: dict[tuple[str, str], str] = {}  # (owner, key): batch id
        self.batch_of: dict[str, str] = {}  # job id: batch id


class MemoryBatchRows:
    """`BatchRows` over a `MemoryJobStore`'s dicts, held under its lock;
    `job(id)` reads the store's jobs."""

    def __init__(self, held: MemoryBatches, jobs: Any) -> None:
        self._held = held
        self._jobs = jobs

    @property
    def jobs(self) -> Rows:
        found: Rows = self._jobs
        return found

    def hold_owner(self, owner: str) -> None:
        """Nothing: the store's lock holds every admission already."""

    def insert(
        self, batch: Batch, items: Sequence[tuple[Job, dict[str, Any]]], idem: Idempotency | None
    ) -> bool:
        held = self._held
        taken = [job.id for job, _ in items if self._jobs.job(job.id) is not None]
        if taken or len({job.id for job, _ in items}) != len(items) or batch.id in held.batches:
            # As a primary key refuses the insert, before anything is stored.
            raise KeyError(f"batch {batch.id} or its jobs are stored already")
        if idem is not None:
            if (batch.owner, idem.key) in held.keys:
                return False
            if self._jobs.keyed(batch.owner, idem.key) is not None:
                raise _held_by_job(self._jobs, batch.owner, idem)
            held.keys[batch.owner, idem.key] = batch.id
        held.batches[batch.id] = (batch, None if idem is None else idem.digest)
        for index, (job, payload) in enumerate(items):
            self._jobs.insert(job, payload, idem if index == 0 else None)
            held.batch_of[job.id] = batch.id
        return True

    def keyed(self, owner: str, key: str) -> KeyedBatch | None:
        batch_id = self._held.keys.get((owner, key))
        if batch_id is None:
            return None
        batch, digest = self._held.batches[batch_id]
        return batch, digest or ""

    def batch(self, batch_id: str) -> Batch | None:
        found = self._held.batches.get(batch_id)
        return None if found is None else found[0]

    def _items(self, batch_id: str) -> Iterator[Job]:
        batch = self.batch(batch_id)
        for job_id in batch.job_ids if batch is not None else ():
            job = self._jobs.job(job_id)
            if job is not None:
                yield job

    def counts(self, batch_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self._items(batch_id):
            counts[job.status.value] = counts.get(job.status.value, 0) + 1
        return counts

    def count(self, owner: str | None) -> int:
        return sum(1 for b, _ in self._held.batches.values() if owner in (None, b.owner))

    def newest(self, owner: str | None, limit: int, offset: int) -> list[Batch]:
        mine = [b for b, _ in self._held.batches.values() if owner in (None, b.owner)]
        mine.sort(key=lambda b: (b.created_at, b.id), reverse=True)
        return mine[offset : offset + limit]

    def batch_of(self, job_id: str) -> str | None:
        return self._held.batch_of.get(job_id)

    def end(self, batch_id: str, at: str) -> bool:
        found = self._held.batches.get(batch_id)
        if found is None or found[0].finished_at is not None:
            return False
        if any(job.status not in FINISHED for job in self._items(batch_id)):
            return False
        self._held.batches[batch_id] = (replace(found[0], finished_at=at), found[1])
        return True

    def unended(self) -> list[str]:
        return [b.id for b, _ in self._held.batches.values() if b.finished_at is None]

    def prune(self, cutoff: str) -> int:
        held = self._held
        gone = [
            b
            for b, _ in held.batches.values()
            if b.finished_at is not None
            and b.finished_at < cutoff
            and not any(self._jobs.job(job_id) for job_id in b.job_ids)
        ]
        for batch in gone:
            del held.batches[batch.id]
            for job_id in batch.job_ids:
                held.batch_of.pop(job_id, None)
        held.keys = {k: v for k, v in held.keys.items() if v in held.batches}
        return len(gone)
