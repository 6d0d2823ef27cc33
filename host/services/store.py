"""Where jobs live: SQLite by default (embedded, WAL), memory for tests.

A job is written before it is acknowledged, and every change of its status
is committed before anyone is told about it, so a job that was accepted
survives a crash or `kill -9` of the server. `recover()` runs at start-up and
marks the jobs that were pending or running when the last process died as
INTERRUPTED, with the reason in their error.

Each job belongs to an owner (a principal id, never a token). Its input is
stored apart from the record, the image as raw bytes, and read back only by
the worker that runs it (`payload()`); it is dropped when the job finishes.
Every row knows how many bytes it stores (input, result and error), so a
store can tell an owner's usage and its own size, and prune to a size.

The SQLite file, its `-wal` and `-shm` are created 0600 (a new directory
0700) before SQLite opens them: they hold other clients' images and results.
New databases use `auto_vacuum=INCREMENTAL`, so pruning gives the space back
to the file system; a database of an older version gets the missing columns
(its rows belong to "anonymous") and is vacuumed once into that mode.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("plughost.store")

ANONYMOUS = "anonymous"
# Bytes a job's public document adds to its result and error (ids, times, keys).
DOCUMENT_OVERHEAD = 320
# The WAL is cut back to this after a checkpoint instead of keeping its peak size.
WAL_SIZE_LIMIT = 64 * 1024 * 1024


class JobStatus(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    INTERRUPTED = "INTERRUPTED"


FINISHED = frozenset(
    {JobStatus.SUCCESS, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.INTERRUPTED}
)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _cutoff(older_than_s: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=older_than_s)).isoformat()


@dataclass(frozen=True)
class Job:
    """One job record. Its input is not part of it: see `JobStore.payload`."""

    id: str
    plugin: str
    status: JobStatus
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    owner: str = ANONYMOUS

    def public(self) -> dict[str, Any]:
        """What a client may see: everything but the input."""
        return {
            "id": self.id,
            "plugin": self.plugin,
            "status": self.status.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "owner": self.owner,
            "result": self.result,
            "error": self.error,
        }


@dataclass(frozen=True)
class JobPage:
    """A page of jobs, newest first, as serialized public documents.

    `documents` add up to at most the byte cap asked for (a single job may
    pass it alone: a page always holds a job when one matches). `next_offset`
    is where the next page starts, None when this one is the last;
    `truncated` says the byte cap, not the count, ended the page.
    """

    documents: list[str]
    total: int
    next_offset: int | None
    truncated: bool


@dataclass(frozen=True)
class Usage:
    """What one owner keeps in the store."""

    jobs: int
    stored_bytes: int


class JobStore(Protocol):
    def add(self, job: Job, payload: dict[str, Any] | None) -> None: ...
    def get(self, job_id: str) -> Job | None: ...
    def payload(self, job_id: str) -> dict[str, Any] | None: ...
    def document(self, job_id: str) -> tuple[str, str] | None: ...
    def update(self, job: Job) -> None: ...
    def page(
        self,
        owner: str | None,
        status: JobStatus | None,
        plugin: str | None,
        limit: int,
        offset: int,
        max_bytes: int,
    ) -> JobPage: ...
    def usage(self, owner: str) -> Usage: ...
    def prune_owner(self, owner: str, max_jobs: int, max_bytes: int) -> int: ...
    def size_bytes(self) -> int: ...
    def prune(self, older_than_s: float) -> int: ...
    def prune_to_size(self, max_bytes: int) -> int: ...
    def recover(self, reason: dict[str, Any]) -> int: ...
    def close(self) -> None: ...


def encode_payload(payload: dict[str, Any]) -> tuple[bytes, str]:
    """`(image bytes, JSON of the other fields)`; a base64 image is decoded.

    The payload has passed `PluginManagementService.check` before it gets here.
    """
    image = payload.get("image", b"")
    if isinstance(image, str):
        image = base64.b64decode(image, validate=True)
    meta = {k: v for k, v in payload.items() if k != "image"}
    return bytes(image), json.dumps(meta)


def decode_payload(image: bytes | None, meta: str | None) -> dict[str, Any] | None:
    if meta is None:
        return None
    payload: dict[str, Any] = json.loads(meta)
    if image is not None:
        payload["image"] = bytes(image)
    elif payload.pop("_image_bytes", False):  # stored by an older version
        payload["image"] = base64.b64decode(payload["image"])
    return payload


def _json(value: dict[str, Any] | None) -> str | None:
    # ASCII only, so a document's length in characters is its length in bytes.
    return None if value is None else json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def _document(job: Job, result: str | None, error: str | None) -> str:
    """The public document of `job` with its stored result and error spliced in
    as they are: no parsing, so a page costs its size and no more."""
    public = {k: v for k, v in job.public().items() if k not in ("result", "error")}
    head = json.dumps(public, separators=(",", ":"))
    return f'{head[:-1]},"result":{result or "null"},"error":{error or "null"}}}'


def _record_bytes(result: str | None, error: str | None) -> int:
    return len(result or "") + len(error or "")


def filter_clause(
    owner: str | None, status: JobStatus | None, plugin: str | None, placeholder: str
) -> tuple[str, list[str]]:
    """`WHERE ...` (or "") and its arguments for a listing's filters."""
    where, args = [], []
    for column, value in (("owner", owner), ("status", status), ("plugin", plugin)):
        if value is not None:
            where.append(f"{column} = {placeholder}")
            args.append(str(value))
    return (f"WHERE {' AND '.join(where)}" if where else ""), args


def oldest_to_drop(
    finished: Iterable[tuple[str, int]], jobs: int, stored: int, max_jobs: int, max_bytes: int
) -> list[str]:
    """Ids of the finished jobs (`(id, stored bytes)`, oldest first) an owner
    of `jobs` jobs and `stored` bytes drops to keep at most `max_jobs` and
    `max_bytes`."""
    victims = []
    for job_id, size in finished:
        if jobs <= max_jobs and stored <= max_bytes:
            break
        victims.append(job_id)
        jobs -= 1
        stored -= size
    return victims


class MemoryJobStore:
    """Jobs in a dict; for tests and throwaway hosts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._payloads: dict[str, tuple[bytes, str]] = {}
        self._sizes: dict[str, int] = {}

    def add(self, job: Job, payload: dict[str, Any] | None) -> None:
        with self._lock:
            self._jobs[job.id] = job
            if payload is None:  # a finished job: no input kept
                self._sizes[job.id] = _record_bytes(_json(job.result), _json(job.error))
                return
            image, meta = encode_payload(payload)
            self._payloads[job.id] = (image, meta)
            self._sizes[job.id] = len(image) + len(meta)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def payload(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            stored = self._payloads.get(job_id)
        return None if stored is None else decode_payload(*stored)

    def document(self, job_id: str) -> tuple[str, str] | None:
        """`(owner, public document)` of the job, or None."""
        job = self.get(job_id)
        if job is None:
            return None
        return job.owner, _document(job, _json(job.result), _json(job.error))

    def update(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job
            if job.status in FINISHED:
                self._payloads.pop(job.id, None)
                self._sizes[job.id] = _record_bytes(_json(job.result), _json(job.error))

    def page(
        self,
        owner: str | None,
        status: JobStatus | None,
        plugin: str | None,
        limit: int,
        offset: int,
        max_bytes: int,
    ) -> JobPage:
        with self._lock:
            jobs = [
                j
                for j in self._jobs.values()
                if (owner is None or j.owner == owner)
                and (status is None or j.status == status)
                and (plugin is None or j.plugin == plugin)
            ]
        jobs.sort(key=lambda j: j.created_at, reverse=True)
        return _fill_page(
            ((j, _json(j.result), _json(j.error)) for j in jobs[offset:]),
            len(jobs),
            limit,
            offset,
            max_bytes,
        )

    def usage(self, owner: str) -> Usage:
        with self._lock:
            mine = [j for j in self._jobs.values() if j.owner == owner]
            return Usage(len(mine), sum(self._sizes.get(j.id, 0) for j in mine))

    def prune_owner(self, owner: str, max_jobs: int, max_bytes: int) -> int:
        """Drop `owner`'s oldest finished jobs until it keeps at most `max_jobs`
        jobs and `max_bytes`; return how many went."""
        with self._lock:
            mine = sorted(
                (j for j in self._jobs.values() if j.owner == owner), key=lambda j: j.created_at
            )
            jobs, stored = len(mine), sum(self._sizes.get(j.id, 0) for j in mine)
            victims = []
            for job in mine:
                if jobs <= max_jobs and stored <= max_bytes:
                    break
                if job.status in FINISHED:
                    victims.append(job.id)
                    jobs -= 1
                    stored -= self._sizes.get(job.id, 0)
            self._drop(victims)
        return len(victims)

    def size_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def prune(self, older_than_s: float) -> int:
        cutoff = _cutoff(older_than_s)
        with self._lock:
            old = [
                j.id
                for j in self._jobs.values()
                if j.status in FINISHED and (j.finished_at or j.created_at) < cutoff
            ]
            self._drop(old)
        return len(old)

    def prune_to_size(self, max_bytes: int) -> int:
        with self._lock:
            excess = sum(self._sizes.values()) - max_bytes
            finished = sorted(
                (j for j in self._jobs.values() if j.status in FINISHED),
                key=lambda j: j.created_at,
            )
            victims = []
            for job in finished:
                if excess <= 0:
                    break
                victims.append(job.id)
                excess -= self._sizes.get(job.id, 0)
            self._drop(victims)
        return len(victims)

    def _drop(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self._jobs.pop(job_id, None)
            self._payloads.pop(job_id, None)
            self._sizes.pop(job_id, None)

    def recover(self, reason: dict[str, Any]) -> int:
        with self._lock:
            stale = [j for j in self._jobs.values() if j.status not in FINISHED]
        for job in stale:
            self.update(_interrupted(job, reason))
        return len(stale)

    def close(self) -> None:
        """Nothing to release."""


def _interrupted(job: Job, reason: dict[str, Any]) -> Job:
    return replace(job, status=JobStatus.INTERRUPTED, finished_at=now_iso(), error=reason)


def _fill_page(
    rows: Iterable[tuple[Job, str | None, str | None]],
    total: int,
    limit: int,
    offset: int,
    max_bytes: int,
) -> JobPage:
    documents: list[str] = []
    used = 0
    truncated = False
    for job, result, error in rows:
        if len(documents) == limit:
            break
        document = _document(job, result, error)
        if documents and used + len(document) + 1 > max_bytes:
            truncated = True
            break
        documents.append(document)
        used += len(document) + 1  # the comma between documents
    end = offset + len(documents)
    return JobPage(documents, total, end if end < total else None, truncated)


_COLUMNS = (
    "id, plugin, status, created_at, started_at, finished_at, result, error, owner, stored_bytes"
)


def job_from_row(row: tuple[Any, ...]) -> Job:
    """The Job of a row's first nine columns, in the order of `_COLUMNS`."""
    return Job(
        id=row[0],
        plugin=row[1],
        status=JobStatus(row[2]),
        created_at=row[3],
        started_at=row[4],
        finished_at=row[5],
        result=None if row[6] is None else json.loads(row[6]),
        error=None if row[7] is None else json.loads(row[7]),
        owner=row[8],
    )


def new_row(job: Job, payload: dict[str, Any] | None) -> tuple[Any, ...]:
    """A new job's row, in the order of `_COLUMNS` then payload and image
    (every store keeps the same record: the input as raw bytes plus its
    metadata, and the bytes it stores counted for the owner's quota). A
    job stored only once finished (`payload` None) keeps no input."""
    image, meta = encode_payload(payload) if payload is not None else (None, None)
    result, error = _json(job.result), _json(job.error)
    stored = len(image or b"") + len(meta or "") + _record_bytes(result, error)
    return (
        job.id,
        job.plugin,
        job.status.value,
        job.created_at,
        job.started_at,
        job.finished_at,
        result,
        error,
        job.owner,
        stored,
        meta,
        image,
    )


def update_row(job: Job) -> tuple[Any, ...]:
    """The parameters of a job's update, in the order of every store's UPDATE
    statement: status, times, result, error, then whether it is finished
    (three times: its input is dropped and its stored bytes recounted) and
    the bytes it keeps, then its id."""
    result, error = _json(job.result), _json(job.error)
    finished = job.status in FINISHED
    return (
        job.status.value,
        job.started_at,
        job.finished_at,
        result,
        error,
        finished,
        finished,
        finished,
        _record_bytes(result, error),
        job.id,
    )


_FINISHED_SQL = ", ".join(f"'{s.value}'" for s in sorted(FINISHED))


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


class SQLiteJobStore:
    """Jobs in an SQLite file (WAL); thread-safe."""

    def __init__(self, path: str | Path, synchronous: str = "NORMAL") -> None:
        """Open (or create) the database at `path`. `synchronous` is "NORMAL" or
        "FULL" (SQLite's setting; see `Settings.db_sync`)."""
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self._page_size = 0
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
                stored_bytes INTEGER NOT NULL DEFAULT 0)"""
        )
        self._migrate()
        self._usage_table()
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

    def add(self, job: Job, payload: dict[str, Any] | None) -> None:
        with self._lock:
            self._db.execute(
                f"INSERT INTO jobs ({_COLUMNS}, payload, image) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                new_row(job, payload),
            )

    def update(self, job: Job) -> None:
        """Write the job's status, times, result and error; a finished job's
        input is deleted in the same statement."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, started_at = ?, finished_at = ?, result = ?, "
                "error = ?, "
                "payload = CASE WHEN ? THEN NULL ELSE payload END, "
                "image = CASE WHEN ? THEN NULL ELSE image END, "
                "stored_bytes = CASE WHEN ? THEN ? ELSE stored_bytes END WHERE id = ?",
                update_row(job),
            )

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        return None if row is None else job_from_row(row)

    def document(self, job_id: str) -> tuple[str, str] | None:
        """`(owner, public document)` of the job, its result spliced in unparsed, or None."""
        with self._lock:
            cursor = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
            try:
                for job, result, error in self._raw_rows(cursor):
                    return job.owner, _document(job, result, error)
            finally:
                cursor.close()
        return None

    def payload(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT image, payload FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        return None if row is None else decode_payload(row[0], row[1])

    def page(
        self,
        owner: str | None,
        status: JobStatus | None,
        plugin: str | None,
        limit: int,
        offset: int,
        max_bytes: int,
    ) -> JobPage:
        clause, args = filter_clause(owner, status, plugin, "?")
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM jobs {clause}", args).fetchone()[0]
            # One row at a time: at most one row past the byte cap is ever read.
            cursor = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs {clause} ORDER BY created_at DESC LIMIT ? OFFSET ?",
                [*args, limit, offset],
            )
            try:
                return _fill_page(self._raw_rows(cursor), int(total), limit, offset, max_bytes)
            finally:
                cursor.close()

    @staticmethod
    def _raw_rows(cursor: sqlite3.Cursor) -> Iterable[tuple[Job, str | None, str | None]]:
        for row in cursor:
            job = Job(
                id=row[0],
                plugin=row[1],
                status=JobStatus(row[2]),
                created_at=row[3],
                started_at=row[4],
                finished_at=row[5],
                owner=row[8],
            )
            yield job, row[6], row[7]

    def usage(self, owner: str) -> Usage:
        with self._lock:
            row = self._db.execute(
                "SELECT jobs, bytes FROM owner_usage WHERE owner = ?", (owner,)
            ).fetchone()
        return Usage(int(row[0]), int(row[1])) if row else Usage(0, 0)

    def prune_owner(self, owner: str, max_jobs: int, max_bytes: int) -> int:
        """Delete `owner`'s oldest finished jobs until it keeps at most
        `max_jobs` jobs and `max_bytes`; return how many went. The freed
        pages are reused by the jobs that follow (no vacuum on this path)."""
        with self._lock:
            row = self._db.execute(
                "SELECT jobs, bytes FROM owner_usage WHERE owner = ?", (owner,)
            ).fetchone()
            jobs, stored = row if row else (0, 0)
            if jobs <= max_jobs and stored <= max_bytes:
                return 0
            # Read oldest first, only as far as needed (the owner index is in
            # that order): a client at its quota drops one job per new one.
            finished = self._db.execute(
                "SELECT id, stored_bytes FROM jobs "
                f"WHERE owner = ? AND status IN ({_FINISHED_SQL}) ORDER BY created_at",
                (owner,),
            )
            victims = oldest_to_drop(finished, jobs, stored, max_jobs, max_bytes)
            finished.close()
            self._db.executemany("DELETE FROM jobs WHERE id = ?", [(v,) for v in victims])
        return len(victims)

    def size_bytes(self) -> int:
        """Bytes of the database in use (free pages not counted)."""
        with self._lock:
            return self._size_bytes()

    def _size_bytes(self) -> int:
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        if not self._page_size:  # fixed once the database exists
            self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        return int((pages - free) * self._page_size)

    def prune(self, older_than_s: float) -> int:
        with self._lock:
            cursor = self._db.execute(
                f"DELETE FROM jobs WHERE status IN ({_FINISHED_SQL}) "
                "AND COALESCE(finished_at, created_at) < ?",
                (_cutoff(older_than_s),),
            )
            if cursor.rowcount:
                self._shrink()
        return cursor.rowcount

    def prune_to_size(self, max_bytes: int) -> int:
        """Delete the oldest finished jobs until the database uses at most
        `max_bytes` (or no finished job is left); return how many went."""
        pruned = 0
        with self._lock:
            while (excess := self._size_bytes() - max_bytes) > 0:
                oldest = self._db.execute(
                    f"SELECT id, stored_bytes FROM jobs WHERE status IN ({_FINISHED_SQL}) "
                    "ORDER BY created_at LIMIT 1000"
                ).fetchall()
                victims = []
                for job_id, stored in oldest:
                    victims.append(job_id)
                    excess -= stored
                    if excess <= 0:
                        break
                if not victims:
                    break
                self._db.executemany("DELETE FROM jobs WHERE id = ?", [(v,) for v in victims])
                pruned += len(victims)
            if pruned:
                self._shrink()
        return pruned

    def _shrink(self) -> None:
        # Free pages go back to the file system; in WAL mode the file is cut
        # at the checkpoint. The pragma frees one page per step, and only
        # executescript steps it to the end.
        self._db.executescript("PRAGMA incremental_vacuum;")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def recover(self, reason: dict[str, Any]) -> int:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, error = ?, payload = NULL, "
                "image = NULL, stored_bytes = COALESCE(LENGTH(result), 0) + LENGTH(?) "
                "WHERE status IN (?, ?)",
                (
                    JobStatus.INTERRUPTED.value,
                    now_iso(),
                    _json(reason),
                    _json(reason),
                    JobStatus.PENDING.value,
                    JobStatus.RUNNING.value,
                ),
            )
        return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
