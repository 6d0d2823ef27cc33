"""Where jobs live: SQLite by default (embedded, WAL), memory for tests.

A job is written before it is acknowledged, and every change of its status
is committed before anyone is told about it, so a job that was accepted
survives a crash or `kill -9` of the server. `recover()` runs at start-up and
marks the jobs that were pending or running when the last process died as
INTERRUPTED, with the reason in their error.
"""

from __future__ import annotations

import base64
import enum
import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol


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


@dataclass(frozen=True)
class Job:
    """One job. `payload` (the input) is kept only until the job finishes."""

    id: str
    plugin: str
    status: JobStatus
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    payload: dict[str, Any] | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        """What a client may see: everything but the input."""
        return {
            "id": self.id,
            "plugin": self.plugin,
            "status": self.status.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "result": self.result,
            "error": self.error,
        }


class JobStore(Protocol):
    def add(self, job: Job) -> None: ...
    def get(self, job_id: str) -> Job | None: ...
    def update(self, job: Job) -> None: ...
    def list(
        self, status: JobStatus | None, plugin: str | None, limit: int, offset: int
    ) -> tuple[list[Job], int]: ...
    def prune(self, older_than_s: float) -> int: ...
    def recover(self, reason: dict[str, Any]) -> int: ...
    def close(self) -> None: ...


class MemoryJobStore:
    """Jobs in a dict; for tests and throwaway hosts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def update(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job

    def list(
        self, status: JobStatus | None, plugin: str | None, limit: int, offset: int
    ) -> tuple[list[Job], int]:
        with self._lock:
            jobs = [
                j
                for j in self._jobs.values()
                if (status is None or j.status == status) and (plugin is None or j.plugin == plugin)
            ]
        jobs.sort(key=lambda j: j.created_at, reverse=True)
        return jobs[offset : offset + limit], len(jobs)

    def prune(self, older_than_s: float) -> int:
        cutoff = (datetime.now(UTC) - timedelta(seconds=older_than_s)).isoformat()
        with self._lock:
            old = [
                j.id
                for j in self._jobs.values()
                if j.status in FINISHED and (j.finished_at or j.created_at) < cutoff
            ]
            for job_id in old:
                del self._jobs[job_id]
        return len(old)

    def recover(self, reason: dict[str, Any]) -> int:
        with self._lock:
            stale = [j for j in self._jobs.values() if j.status not in FINISHED]
            for job in stale:
                self._jobs[job.id] = _interrupted(job, reason)
        return len(stale)

    def close(self) -> None:
        """Nothing to release."""


def _interrupted(job: Job, reason: dict[str, Any]) -> Job:
    return replace(
        job, status=JobStatus.INTERRUPTED, finished_at=now_iso(), error=reason, payload=None
    )


def _encode_payload(payload: dict[str, Any] | None) -> str | None:
    if payload is None:
        return None
    image = payload.get("image")
    stored = dict(payload)
    if isinstance(image, bytes | bytearray):
        stored["image"] = base64.b64encode(image).decode()
        stored["_image_bytes"] = True
    return json.dumps(stored)


def _decode_payload(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    payload: dict[str, Any] = json.loads(text)
    if payload.pop("_image_bytes", False):
        payload["image"] = base64.b64decode(payload["image"])
    return payload


class SQLiteJobStore:
    """Jobs in an SQLite file (WAL); thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # In WAL mode a commit with synchronous=NORMAL is in the OS's hands
        # before it returns: it survives the server being killed at any point
        # (the promise the API makes), though not a power cut; FULL would add
        # an fsync to each of a job's three commits. Set PLUGHOST_DB_SYNC=FULL
        # to trade throughput for power-loss durability.
        sync = os.environ.get("PLUGHOST_DB_SYNC", "NORMAL").upper()
        self._db.execute(f"PRAGMA synchronous={'FULL' if sync == 'FULL' else 'NORMAL'}")
        self._db.execute(
            """CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY, plugin TEXT NOT NULL, status TEXT NOT NULL,
                created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT,
                result TEXT, error TEXT, payload TEXT)"""
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at)")
        if str(path) != ":memory:":
            os.chmod(self.path, 0o600)  # inputs may be private images

    def _row(self, job: Job) -> tuple[Any, ...]:
        return (
            job.id,
            job.plugin,
            job.status.value,
            job.created_at,
            job.started_at,
            job.finished_at,
            None if job.result is None else json.dumps(job.result),
            None if job.error is None else json.dumps(job.error),
            _encode_payload(job.payload),
        )

    @staticmethod
    def _job(row: tuple[Any, ...]) -> Job:
        return Job(
            id=row[0],
            plugin=row[1],
            status=JobStatus(row[2]),
            created_at=row[3],
            started_at=row[4],
            finished_at=row[5],
            result=None if row[6] is None else json.loads(row[6]),
            error=None if row[7] is None else json.loads(row[7]),
            payload=_decode_payload(row[8]),
        )

    def add(self, job: Job) -> None:
        with self._lock:
            self._db.execute("INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?)", self._row(job))

    def update(self, job: Job) -> None:
        with self._lock:
            self._db.execute("REPLACE INTO jobs VALUES (?,?,?,?,?,?,?,?,?)", self._row(job))

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def list(
        self, status: JobStatus | None, plugin: str | None, limit: int, offset: int
    ) -> tuple[list[Job], int]:
        where, args = [], []
        if status is not None:
            where.append("status = ?")
            args.append(status.value)
        if plugin is not None:
            where.append("plugin = ?")
            args.append(plugin)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM jobs {clause}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT id, plugin, status, created_at, started_at, finished_at, result, error, "
                f"NULL FROM jobs {clause} ORDER BY created_at DESC LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
        return [self._job(row) for row in rows], int(total)

    def prune(self, older_than_s: float) -> int:
        cutoff = (datetime.now(UTC) - timedelta(seconds=older_than_s)).isoformat()
        finished = [s.value for s in FINISHED]
        with self._lock:
            cursor = self._db.execute(
                f"DELETE FROM jobs WHERE status IN ({','.join('?' * len(finished))}) "
                "AND COALESCE(finished_at, created_at) < ?",
                [*finished, cutoff],
            )
        return cursor.rowcount

    def recover(self, reason: dict[str, Any]) -> int:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, error = ?, payload = NULL "
                "WHERE status IN (?, ?)",
                (
                    JobStatus.INTERRUPTED.value,
                    now_iso(),
                    json.dumps(reason),
                    JobStatus.PENDING.value,
                    JobStatus.RUNNING.value,
                ),
            )
        return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
