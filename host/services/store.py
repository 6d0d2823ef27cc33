"""The single-node job stores: SQLite by default (embedded, WAL), memory for tests.

Both keep the contract of `JobStore` (host/services/jobrows.py, where the
record and the rules of paging and pruning are written once); this module
gives each its rows. The shared store of a multi-node deployment is
`PgJobStore` (host/cluster/pgstore.py).

A job is written before it is acknowledged, and every change of its status
is committed before anyone is told about it, so a job that was accepted
survives a crash or `kill -9` of the server. `recover()` runs at start-up and
marks the jobs that were pending or running when the last process died as
INTERRUPTED, with the reason in their error.

The SQLite file, its `-wal` and `-shm` are created 0600 (a new directory
0700) before SQLite opens them: they hold other clients' images and results.
New databases use `auto_vacuum=INCREMENTAL`, so pruning gives the space back
to the file system; a database of an older version gets the missing columns
(its rows belong to "anonymous", without idempotency keys) and is vacuumed
once into that mode.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from host.services.batchrows import (
    MemoryBatches,
    MemoryBatchRows,
    SqlBatchRows,
    batch_schema,
)
from host.services.jobrows import (
    ANONYMOUS,
    FINISHED,
    Idempotency,
    Job,
    JobFilter,
    JobPage,
    JobStatus,
    JobStore,
    Keyed,
    RawJob,
    Usage,
    decode_payload,
    interrupted,
    new_row,
    now_iso,
    raw_job,
    record_bytes,
    to_json,
)
from host.services.jobsql import Dialect, SqlRows

__all__ = [
    "ANONYMOUS",
    "FINISHED",
    "Job",
    "JobPage",
    "JobStatus",
    "JobStore",
    "MemoryJobStore",
    "SQLiteJobStore",
    "Usage",
    "now_iso",
]

log = logging.getLogger("plughost.store")

# The WAL is cut back to this after a checkpoint instead of keeping its peak size.
WAL_SIZE_LIMIT = 64 * 1024 * 1024


class _MemoryRows:
    """`Rows` in dicts: the records, the inputs and each job's stored bytes."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self._payloads: dict[str, tuple[bytes, str]] = {}
        self._sizes: dict[str, int] = {}
        self._keys: dict[tuple[str, str], tuple[str, str]] = {}  # (owner, key): (id, digest)
        self._key_of: dict[str, tuple[str, str]] = {}  # id: (owner, key)

    def insert(self, job: Job, payload: dict[str, Any] | None, idem: Idempotency | None) -> bool:
        if idem is not None:
            if (job.owner, idem.key) in self._keys:
                return False
            self._keys[job.owner, idem.key] = (job.id, idem.digest)
            self._key_of[job.id] = (job.owner, idem.key)
        row = new_row(job, payload, idem)
        self.jobs[job.id] = job
        self._sizes[job.id] = row.stored_bytes
        if row.image is not None and row.payload is not None:
            self._payloads[job.id] = (row.image, row.payload)
        return True

    def keyed(self, owner: str, key: str) -> Keyed | None:
        held = self._keys.get((owner, key))
        return None if held is None else (self.jobs[held[0]], held[1])

    def update(self, job: Job) -> None:
        if job.id not in self.jobs:
            return  # as an UPDATE of no row
        self.jobs[job.id] = job
        if job.status in FINISHED:
            self._payloads.pop(job.id, None)
            self._sizes[job.id] = record_bytes(to_json(job.result), to_json(job.error))

    def job(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def raw(self, job_id: str) -> RawJob | None:
        job = self.jobs.get(job_id)
        return None if job is None else raw_job(job)

    def payload(self, job_id: str) -> dict[str, Any] | None:
        stored = self._payloads.get(job_id)
        return None if stored is None else decode_payload(*stored)

    def count(self, where: JobFilter) -> int:
        return sum(1 for job in self.jobs.values() if where.matches(job))

    def newest(self, where: JobFilter, limit: int, offset: int) -> Generator[RawJob, None, None]:
        found = sorted(
            (job for job in self.jobs.values() if where.matches(job)),
            key=lambda job: job.created_at,
            reverse=True,
        )
        yield from (raw_job(job) for job in found[offset : offset + limit])

    def usage(self, owner: str) -> Usage:
        mine = [job.id for job in self.jobs.values() if job.owner == owner]
        return Usage(len(mine), sum(self._sizes[job_id] for job_id in mine))

    def finished(self, owner: str | None) -> Generator[tuple[str, int], None, None]:
        found = sorted(
            (
                job
                for job in self.jobs.values()
                if job.status in FINISHED and owner in (None, job.owner)
            ),
            key=lambda job: job.created_at,
        )
        yield from ((job.id, self._sizes[job.id]) for job in found)

    def expired(self, cutoff: str) -> list[str]:
        return [
            job.id
            for job in self.jobs.values()
            if job.status in FINISHED and (job.finished_at or job.created_at) < cutoff
        ]

    def delete(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            self.jobs.pop(job_id, None)
            self._payloads.pop(job_id, None)
            self._sizes.pop(job_id, None)
            self._keys.pop(self._key_of.pop(job_id, ("", "")), None)

    def size_bytes(self) -> int:
        return sum(self._sizes.values())


class MemoryJobStore(JobStore):
    """Jobs in dicts; for tests and throwaway hosts. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = _MemoryRows()
        self._batches = MemoryBatches()

    @contextmanager
    def _rows(self) -> Iterator[_MemoryRows]:
        with self._lock:
            yield self._held

    @contextmanager
    def batch_rows(self) -> Iterator[MemoryBatchRows]:
        """The batches (host/services/batchrows.py), under the store's lock."""
        with self._lock:
            yield MemoryBatchRows(self._batches, self._held)

    def _reclaim(self) -> None:
        """Nothing: a dropped job's memory goes with it."""

    def recover(self, reason: dict[str, Any]) -> int:
        with self._rows() as rows:
            stale = [job for job in rows.jobs.values() if job.status not in FINISHED]
            for job in stale:
                rows.update(interrupted(job, reason))
        return len(stale)

    def close(self) -> None:
        """Nothing to release."""


def _private_file(path: Path, follow: bool = True) -> None:
    """Create `path` 0600 if it is missing; take group and other bits off if not."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags, 0o600)
    try:
        info = os.fstat(fd)
        if info.st_mode & 0o077 and info.st_uid == os.geteuid():
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


SQLITE = Dialect(
    table="jobs",
    mark="?",
    # Kept by triggers (SQLiteJobStore._usage_table): one row, not a sum.
    usage="SELECT jobs, bytes FROM owner_usage WHERE owner = ?",
    # The pages in use (free pages not counted): what the file needs.
    size="SELECT (c.page_count - f.freelist_count) * s.page_size "
    "FROM pragma_page_count() c, pragma_freelist_count() f, pragma_page_size() s",
)


# Per-owner usage, kept by triggers (SQLiteJobStore._usage_table): created
# with its triggers and filled from the jobs already stored, in one transaction.
USAGE_SCHEMA = """
BEGIN;
CREATE TABLE owner_usage (
    owner TEXT PRIMARY KEY, jobs INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT INTO owner_usage (owner, jobs, bytes)
    SELECT owner, COUNT(*), COALESCE(SUM(stored_bytes), 0) FROM jobs GROUP BY owner;
CREATE TRIGGER owner_usage_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO owner_usage (owner, jobs, bytes) VALUES (NEW.owner, 1, NEW.stored_bytes)
    ON CONFLICT (owner) DO UPDATE SET jobs = jobs + 1, bytes = bytes + NEW.stored_bytes;
END;
CREATE TRIGGER owner_usage_delete AFTER DELETE ON jobs BEGIN
    UPDATE owner_usage SET jobs = jobs - 1, bytes = bytes - OLD.stored_bytes
    WHERE owner = OLD.owner;
END;
CREATE TRIGGER owner_usage_update AFTER UPDATE OF owner, stored_bytes ON jobs BEGIN
    UPDATE owner_usage SET jobs = jobs - 1, bytes = bytes - OLD.stored_bytes
    WHERE owner = OLD.owner;
    INSERT INTO owner_usage (owner, jobs, bytes) VALUES (NEW.owner, 1, NEW.stored_bytes)
    ON CONFLICT (owner) DO UPDATE SET jobs = jobs + 1, bytes = bytes + NEW.stored_bytes;
END;
COMMIT;
"""


class SQLiteJobStore(JobStore):
    """Jobs in an SQLite file (WAL); thread-safe."""

    def __init__(self, path: str | Path, synchronous: str = "NORMAL") -> None:
        """Open (or create) the database at `path`. `synchronous` is "NORMAL" or
        "FULL" (SQLite's setting; see `Settings.db_sync`)."""
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        in_memory = str(path) == ":memory:"
        if not in_memory:
            # A new directory is ours alone; an existing one is the operator's.
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # SQLite gives the -wal and -shm it creates the database file's
            # mode; creating all three 0600 first leaves no moment of 0644.
            _private_file(self.path)
            for suffix in ("-wal", "-shm"):
                _private_file(self.path.with_name(self.path.name + suffix), follow=False)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        fresh = self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
        if fresh:
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only before the first table
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        # In WAL mode a commit with synchronous=NORMAL is in the OS's hands
        # before it returns: it survives the server being killed at any point
        # (the promise the API makes), though not a power cut; FULL would add
        # an fsync to each of a job's three commits. FULL (db_sync in the
        # settings, PLUGHOST_DB_SYNC) trades throughput for power-loss durability.
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute(
            """CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY, plugin TEXT NOT NULL, status TEXT NOT NULL,
                created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT,
                result TEXT, error TEXT, payload TEXT,
                owner TEXT NOT NULL DEFAULT 'anonymous', image BLOB,
                stored_bytes INTEGER NOT NULL DEFAULT 0, idem_key TEXT, request_hash TEXT)"""
        )
        self._migrate()
        # One job per client and idempotency key: enforced by the insert itself.
        self._db.execute(
            "CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs (owner, idem_key) "
            "WHERE idem_key IS NOT NULL"
        )
        self._usage_table()
        self._db.executescript(batch_schema("jobs", "batches"))
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at)")
        # Covers the per-owner listing and usage without reading the rows.
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS jobs_owner "
            "ON jobs (owner, created_at, status, finished_at, stored_bytes)"
        )
        if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            log.warning("switching %s to incremental vacuum (a one-time VACUUM)", self.path)
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("VACUUM")

    def _migrate(self) -> None:
        """Add the columns of this version to a database of an older one."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        added = False
        for column, declaration in (
            ("owner", "TEXT NOT NULL DEFAULT 'anonymous'"),
            ("image", "BLOB"),
            ("stored_bytes", "INTEGER NOT NULL DEFAULT 0"),
        ):
            if column not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {declaration}")
                added = True
        for column in ("idem_key", "request_hash", "batch_id"):  # no old row has a key
            if column not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")
        if added:
            self._db.execute(
                "UPDATE jobs SET stored_bytes = COALESCE(LENGTH(result), 0) "
                "+ COALESCE(LENGTH(error), 0) + COALESCE(LENGTH(payload), 0)"
            )
            log.info("added owner and size columns to %s; old jobs belong to anonymous", self.path)

    def _usage_table(self) -> None:
        """Each owner's job count and stored bytes, kept by triggers on every
        write to `jobs`: the quota check on each new job reads one row instead
        of summing the owner's jobs (about 0.25 ms at 1,000 of them)."""
        exists = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'owner_usage'"
        ).fetchone()
        if not exists:
            self._db.executescript(USAGE_SCHEMA)

    @contextmanager
    def _rows(self) -> Iterator[SqlRows]:
        with self._lock:
            yield SqlRows(self._db, SQLITE)

    @contextmanager
    def batch_rows(self) -> Iterator[SqlBatchRows]:
        """The batches (host/services/batchrows.py), in one transaction."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield SqlBatchRows(self._db, SQLITE, "batches")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _reclaim(self) -> None:
        # Free pages go back to the file system; in WAL mode the file is cut
        # at the checkpoint. The pragma frees one page per step, and only
        # executescript steps it to the end.
        self._db.executescript("PRAGMA incremental_vacuum;")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def recover(self, reason: dict[str, Any]) -> int:
        error = to_json(reason)
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, error = ?, payload = NULL, "
                "image = NULL, stored_bytes = COALESCE(LENGTH(result), 0) + LENGTH(?) "
                "WHERE status IN (?, ?)",
                (
                    JobStatus.INTERRUPTED.value,
                    now_iso(),
                    error,
                    error,
                    JobStatus.PENDING.value,
                    JobStatus.RUNNING.value,
                ),
            )
        return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
