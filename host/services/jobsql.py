"""The job stores' SQL, written once for SQLite and PostgreSQL.

`SqlRows` answers the `Rows` questions (host/services/jobrows.py) with one
statement each, over a connection of either database: sqlite3's and
psycopg's both run `execute(sql, params)` and return a cursor. A `Dialect`
holds the little that differs: the table's name, the parameter mark, and
how an owner's usage and the store's size are read.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from host.services.jobrows import (
    COLUMNS,
    FINISHED,
    Idempotency,
    Job,
    JobFilter,
    Keyed,
    RawJob,
    Usage,
    decode_payload,
    job_from_row,
    new_row,
    record_bytes,
    to_json,
)

FINISHED_SQL = ", ".join(f"'{s.value}'" for s in sorted(FINISHED))
# Ids per DELETE: well under SQLite's limit of bound parameters.
DELETE_BATCH = 500


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def __iter__(self) -> Iterator[Any]: ...
    def close(self) -> None: ...


class Connection(Protocol):
    def execute(self, sql: str, params: Sequence[Any], /) -> Cursor: ...


@dataclass(frozen=True)
class Dialect:
    """What one database spells its own way. Statements are written with
    `?` marks; `mark` replaces them. `usage` takes the owner and returns
    `(jobs, bytes)` (no row: none); `size` returns the store's bytes."""

    table: str
    mark: str
    usage: str
    size: str


class SqlRows:
    """`Rows` in `dialect` over `conn`, for as long as its holder keeps it."""

    def __init__(self, conn: Connection, dialect: Dialect) -> None:
        self._conn = conn
        self._dialect = dialect
        self._table = dialect.table

    @property
    def connection(self) -> Connection:
        """The connection the rows are read over (held as they are)."""
        return self._conn

    @property
    def dialect(self) -> Dialect:
        return self._dialect

    def _run(self, statement: str, params: Sequence[Any] = ()) -> Cursor:
        return self._conn.execute(statement.replace("?", self._dialect.mark), params)

    def _where(self, where: JobFilter) -> tuple[str, list[str]]:
        terms = where.terms()
        clause = " AND ".join(f"{column} = ?" for column, _ in terms)
        return (f"WHERE {clause}" if terms else ""), [value for _, value in terms]

    def insert(self, job: Job, payload: dict[str, Any] | None, idem: Idempotency | None) -> bool:
        # The columns, payload, image, idem_key and request_hash.
        marks = ",".join("?" * (COLUMNS.count(",") + 5))
        # A keyed insert the unique index on (owner, idem_key) refuses does
        # nothing (a racing transaction's insert is waited for first).
        held = " ON CONFLICT DO NOTHING" if idem is not None else ""
        cursor = self._run(
            f"INSERT INTO {self._table} ({COLUMNS}, payload, image, idem_key, request_hash) "
            f"VALUES ({marks}){held}",
            new_row(job, payload, idem),
        )
        return cursor.rowcount == 1

    def keyed(self, owner: str, key: str) -> Keyed | None:
        row = self._run(
            f"SELECT {COLUMNS}, request_hash FROM {self._table} WHERE owner = ? AND idem_key = ?",
            (owner, key),
        ).fetchone()
        return None if row is None else (job_from_row(row), row[10])

    def update(self, job: Job) -> None:
        result, error = to_json(job.result), to_json(job.error)
        finished = job.status in FINISHED
        self._run(
            f"UPDATE {self._table} SET status = ?, started_at = ?, finished_at = ?, "
            "result = ?, error = ?, "
            "payload = CASE WHEN ? THEN NULL ELSE payload END, "
            "image = CASE WHEN ? THEN NULL ELSE image END, "
            "stored_bytes = CASE WHEN ? THEN ? ELSE stored_bytes END WHERE id = ?",
            (
                job.status.value,
                job.started_at,
                job.finished_at,
                result,
                error,
                finished,
                finished,
                finished,
                record_bytes(result, error),
                job.id,
            ),
        )

    def _row(self, job_id: str) -> Any:
        return self._run(f"SELECT {COLUMNS} FROM {self._table} WHERE id = ?", (job_id,)).fetchone()

    def job(self, job_id: str) -> Job | None:
        row = self._row(job_id)
        return None if row is None else job_from_row(row)

    def raw(self, job_id: str) -> RawJob | None:
        row = self._row(job_id)
        return None if row is None else (job_from_row(row, parse=False), row[6], row[7])

    def payload(self, job_id: str) -> dict[str, Any] | None:
        row = self._run(f"SELECT image, payload FROM {self._table} WHERE id = ?", (job_id,))
        found = row.fetchone()
        return None if found is None else decode_payload(found[0], found[1])

    def count(self, where: JobFilter) -> int:
        clause, args = self._where(where)
        return int(self._run(f"SELECT COUNT(*) FROM {self._table} {clause}", args).fetchone()[0])

    def newest(self, where: JobFilter, limit: int, offset: int) -> Generator[RawJob, None, None]:
        clause, args = self._where(where)
        cursor = self._run(
            f"SELECT {COLUMNS} FROM {self._table} {clause} "
            "ORDER BY created_at DESC LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        try:
            for row in cursor:  # one at a time: the page stops at its byte cap
                yield job_from_row(row, parse=False), row[6], row[7]
        finally:
            cursor.close()

    def usage(self, owner: str) -> Usage:
        row = self._run(self._dialect.usage, (owner,)).fetchone()
        return Usage(int(row[0]), int(row[1])) if row else Usage(0, 0)

    def finished(self, owner: str | None) -> Generator[tuple[str, int], None, None]:
        mine, args = ("AND owner = ? ", (owner,)) if owner is not None else ("", ())
        cursor = self._run(
            f"SELECT id, stored_bytes FROM {self._table} "
            f"WHERE status IN ({FINISHED_SQL}) {mine}ORDER BY created_at",
            args,
        )
        try:
            for job_id, stored in cursor:
                yield job_id, int(stored)
        finally:
            cursor.close()

    def expired(self, cutoff: str) -> list[str]:
        cursor = self._run(
            f"SELECT id FROM {self._table} WHERE status IN ({FINISHED_SQL}) "
            "AND COALESCE(finished_at, created_at) < ?",
            (cutoff,),
        )
        try:
            return [row[0] for row in cursor]
        finally:
            cursor.close()

    def delete(self, job_ids: Sequence[str]) -> None:
        for start in range(0, len(job_ids), DELETE_BATCH):
            batch = job_ids[start : start + DELETE_BATCH]
            marks = ",".join("?" * len(batch))
            self._run(f"DELETE FROM {self._table} WHERE id IN ({marks})", batch)

    def size_bytes(self) -> int:
        row = self._run(self._dialect.size).fetchone()
        return int(row[0]) if row else 0
