"""The callback outbox: one row per callback, in the job store itself.

    submit ──add──▶ PENDING (due once its subject has ended: a finished job)
                      │  claim: due rows, DELIVERING under a lease (a token and an
                      │  expiry); PostgreSQL: FOR UPDATE SKIP LOCKED, so two
                      │  nodes never hold the same row; an expired lease is due again
                      ▼
                    settle (only by the lease's holder):
                      DELIVERED (2xx) | PENDING (next_attempt_at later) | FAILED

Every store keeps the same contract (`Outbox`): `MemoryOutbox` beside a
`MemoryJobStore`, `SqlOutbox` over the connection of an SQLite or
PostgreSQL job store (table `callbacks` / `plughost_callbacks`). A row
names its subject by kind and id: a "job" (ended once FINISHED) or a
"batch" (ended once its `finished_at` is set: host/services/batchrows.py);
each kind says in `ENDED` (SQL) and `MemoryOutbox.ended` when its subject
has ended. The row is written with its subject, before it runs: a host
that restarts after the subject ended still finds it. Rows whose subject
is gone (pruned) are swept.
"""

from __future__ import annotations

import abc
import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from host.services.batchrows import rows_of
from host.services.jobrows import FINISHED, JobStore
from host.services.jobsql import FINISHED_SQL, Connection, SqlRows

PENDING, DELIVERING, DELIVERED, FAILED = "PENDING", "DELIVERING", "DELIVERED", "FAILED"
STATES = (PENDING, DELIVERING, DELIVERED, FAILED)
KINDS = ("job", "batch")
COLUMNS = "id, owner, subject_kind, subject_id, url, state, attempts, next_attempt_at, lease"


@dataclass(frozen=True)
class Callback:
    """One callback: where its subject's end is POSTed, and how that went.

    `attempts` holds one dict per attempt: `at` (ISO-8601 UTC),
    `duration_ms`, and `status` (the HTTP status) or `error` (in words)."""

    id: str
    owner: str
    subject_kind: str
    subject_id: str
    url: str
    state: str = PENDING
    attempts: tuple[dict[str, Any], ...] = ()
    next_attempt_at: float = 0.0
    lease: str | None = None

    def public(self) -> dict[str, Any]:
        """What the subject's owner sees: never a response body."""
        return {"url": self.url, "state": self.state, "attempts": list(self.attempts)}


def new_callback(owner: str, kind: str, subject_id: str, url: str, now: float) -> Callback:
    if kind not in KINDS:
        raise ValueError(f"unknown callback subject kind {kind!r}")
    return Callback(uuid.uuid4().hex, owner, kind, subject_id, url, next_attempt_at=now)


def _from_row(row: Any) -> Callback:
    return Callback(
        row[0], row[1], row[2], row[3], row[4], row[5], tuple(json.loads(row[6])), row[7], row[8]
    )


class Outbox(abc.ABC):
    """Where callbacks wait for delivery; thread-safe."""

    @abc.abstractmethod
    def add(self, callback: Callback) -> None: ...

    @abc.abstractmethod
    def of_subject(self, kind: str, subject_id: str) -> Callback | None:
        """The callback of that subject, if it has one."""

    @abc.abstractmethod
    def of_subjects(self, kind: str, subject_ids: list[str]) -> dict[str, Callback]:
        """The callbacks of those subjects that have one, by subject id."""

    @abc.abstractmethod
    def claim(
        self, now: float, lease_s: float, limit: int, skip: frozenset[str] = frozenset()
    ) -> list[Callback]:
        """Up to `limit` due callbacks (PENDING with `next_attempt_at` passed
        and their subject ended, or DELIVERING with a lease expired), none of
        an owner in `skip`, marked DELIVERING under a new lease until
        `now + lease_s`."""

    @abc.abstractmethod
    def settle(self, callback: Callback) -> bool:
        """Write `callback`'s state, attempts and next attempt if its lease
        still holds the row (the lease is released); True if written."""

    @abc.abstractmethod
    def sweep(self, created_before: float) -> int:
        """Delete the callbacks created before `created_before` whose subject
        no longer exists; return how many went."""


@dataclass
class _Held:
    callback: Callback
    lease_until: float = 0.0
    created_at: float = 0.0


@dataclass
class MemoryOutbox(Outbox):
    """Callbacks in a dict, beside a `MemoryJobStore` (for tests and throwaway hosts)."""

    store: JobStore
    _held: dict[str, _Held] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ended(self, kind: str, subject_id: str) -> bool | None:
        """Has the subject ended? None: it does not exist."""
        if kind == "batch":
            with rows_of(self.store) as rows:
                batch = rows.batch(subject_id)
            return None if batch is None else batch.finished_at is not None
        job = self.store.get(subject_id)
        return None if job is None else job.status in FINISHED

    def add(self, callback: Callback) -> None:
        with self._lock:
            self._held[callback.id] = _Held(callback, created_at=callback.next_attempt_at)

    def of_subject(self, kind: str, subject_id: str) -> Callback | None:
        with self._lock:
            found = [
                h.callback
                for h in self._held.values()
                if (h.callback.subject_kind, h.callback.subject_id) == (kind, subject_id)
            ]
        return found[0] if found else None

    def of_subjects(self, kind: str, subject_ids: list[str]) -> dict[str, Callback]:
        wanted = set(subject_ids)
        with self._lock:
            return {
                h.callback.subject_id: h.callback
                for h in self._held.values()
                if h.callback.subject_kind == kind and h.callback.subject_id in wanted
            }

    def claim(
        self, now: float, lease_s: float, limit: int, skip: frozenset[str] = frozenset()
    ) -> list[Callback]:
        with self._lock:
            held = list(self._held.values())
        claimed = []
        for entry in held:
            c = entry.callback
            if c.owner in skip:
                continue
            due = (c.state == PENDING and c.next_attempt_at <= now) or (
                c.state == DELIVERING and entry.lease_until < now
            )
            if not due or not self.ended(c.subject_kind, c.subject_id):
                continue
            with self._lock:
                if self._held.get(c.id) is not entry or entry.callback is not c:
                    continue  # another deliverer took it meanwhile
                entry.callback = replace(c, state=DELIVERING, lease=uuid.uuid4().hex)
                entry.lease_until = now + lease_s
                claimed.append(entry.callback)
            if len(claimed) == limit:
                break
        return claimed

    def settle(self, callback: Callback) -> bool:
        with self._lock:
            entry = self._held.get(callback.id)
            if entry is None or entry.callback.lease != callback.lease:
                return False
            entry.callback = replace(callback, lease=None)
            entry.lease_until = 0.0
        return True

    def sweep(self, created_before: float) -> int:
        with self._lock:
            held = list(self._held.values())
        gone = [
            e.callback.id
            for e in held
            if e.created_at < created_before
            and self.ended(e.callback.subject_kind, e.callback.subject_id) is None
        ]
        with self._lock:
            for callback_id in gone:
                self._held.pop(callback_id, None)
        return len(gone)


# -- SQL (SQLite and PostgreSQL) ---------------------------------------------

SQLITE_TABLE = """CREATE TABLE IF NOT EXISTS callbacks (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, subject_kind TEXT NOT NULL,
    subject_id TEXT NOT NULL, url TEXT NOT NULL, state TEXT NOT NULL,
    attempts TEXT NOT NULL DEFAULT '[]', next_attempt_at REAL NOT NULL,
    lease TEXT, lease_until REAL, created_at REAL NOT NULL)"""
# The outbox, and the host secret every node signs with (host/services/callbacks.py).
PG_TABLES = """
CREATE TABLE IF NOT EXISTS plughost_secrets (name TEXT PRIMARY KEY, value BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS plughost_callbacks (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, subject_kind TEXT NOT NULL,
    subject_id TEXT NOT NULL, url TEXT NOT NULL, state TEXT NOT NULL,
    attempts TEXT NOT NULL DEFAULT '[]', next_attempt_at DOUBLE PRECISION NOT NULL,
    lease TEXT, lease_until DOUBLE PRECISION, created_at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS plughost_callbacks_subject
    ON plughost_callbacks (subject_kind, subject_id);
CREATE INDEX IF NOT EXISTS plughost_callbacks_due
    ON plughost_callbacks (state, next_attempt_at);
"""
SQLITE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS callbacks_subject ON callbacks (subject_kind, subject_id)",
    "CREATE INDEX IF NOT EXISTS callbacks_due ON callbacks (state, next_attempt_at)",
)
# When each kind's subject has ended (`c` is the callback's row, `{jobs}`
# the jobs table, `{batches}` the batches table).
ENDED = {
    "job": "c.subject_kind = 'job' AND EXISTS (SELECT 1 FROM {jobs} j "
    f"WHERE j.id = c.subject_id AND j.status IN ({FINISHED_SQL}))",
    "batch": "c.subject_kind = 'batch' AND EXISTS (SELECT 1 FROM {batches} b "
    "WHERE b.id = c.subject_id AND b.finished_at IS NOT NULL)",
}
# When each kind's subject exists.
EXISTS = {
    "job": "c.subject_kind = 'job' AND EXISTS (SELECT 1 FROM {jobs} j WHERE j.id = c.subject_id)",
    "batch": "c.subject_kind = 'batch' AND EXISTS "
    "(SELECT 1 FROM {batches} b WHERE b.id = c.subject_id)",
}


class SqlOutbox(Outbox):
    """Callbacks in a table beside the jobs of an SQLite or PostgreSQL job
    store, over its connections (its lock, or one transaction per call)."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        with self._conn() as (conn, rows):
            self._postgres = rows.dialect.mark == "%s"
            jobs = rows.dialect.table
            if not self._postgres:
                conn.execute(SQLITE_TABLE, ())
                for index in SQLITE_INDEXES:
                    conn.execute(index, ())
        self._table = "plughost_callbacks" if self._postgres else "callbacks"
        tables = {"jobs": jobs, "batches": "plughost_batches" if self._postgres else "batches"}
        self._ended = " OR ".join(f"({sql})" for sql in ENDED.values()).format(**tables)
        self._exists = " OR ".join(f"({sql})" for sql in EXISTS.values()).format(**tables)

    @contextmanager
    def _conn(self) -> Iterator[tuple[Connection, SqlRows]]:
        with self._store._rows() as rows:
            assert isinstance(rows, SqlRows)
            yield rows.connection, rows

    def _run(
        self, statement: str, params: tuple[Any, ...] | list[Any] = (), fetch: bool = True
    ) -> list[Any]:
        mark = "%s" if self._postgres else "?"
        with self._conn() as (conn, _):
            cursor = conn.execute(statement.replace("?", mark), params)
            try:
                return list(cursor) if fetch else []
            finally:
                cursor.close()

    def add(self, callback: Callback) -> None:
        self._run(
            f"INSERT INTO {self._table} ({COLUMNS}, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                callback.id,
                callback.owner,
                callback.subject_kind,
                callback.subject_id,
                callback.url,
                callback.state,
                json.dumps(list(callback.attempts)),
                callback.next_attempt_at,
                callback.lease,
                callback.next_attempt_at,
            ),
            fetch=False,
        )

    def of_subject(self, kind: str, subject_id: str) -> Callback | None:
        rows = self._run(
            f"SELECT {COLUMNS} FROM {self._table} WHERE subject_kind = ? AND subject_id = ?",
            (kind, subject_id),
        )
        return _from_row(rows[0]) if rows else None

    def of_subjects(self, kind: str, subject_ids: list[str]) -> dict[str, Callback]:
        if not subject_ids:
            return {}
        marks = ",".join("?" * len(subject_ids))
        rows = self._run(
            f"SELECT {COLUMNS} FROM {self._table} "
            f"WHERE subject_kind = ? AND subject_id IN ({marks})",
            [kind, *subject_ids],
        )
        return {callback.subject_id: callback for callback in map(_from_row, rows)}

    def claim(
        self, now: float, lease_s: float, limit: int, skip: frozenset[str] = frozenset()
    ) -> list[Callback]:
        # One statement: the rows a node takes are marked in the same breath
        # (PostgreSQL skips rows another node's transaction holds).
        lock = " FOR UPDATE OF c SKIP LOCKED" if self._postgres else ""
        owners = sorted(skip)
        not_theirs = f"AND c.owner NOT IN ({', '.join('?' * len(owners))}) " if owners else ""
        rows = self._run(
            f"UPDATE {self._table} SET state = ?, lease = ?, lease_until = ? "
            f"WHERE id IN (SELECT c.id FROM {self._table} c WHERE "
            "((c.state = ? AND c.next_attempt_at <= ?) OR (c.state = ? AND c.lease_until < ?)) "
            f"{not_theirs}AND ({self._ended}) ORDER BY c.next_attempt_at LIMIT ?{lock}) "
            f"RETURNING {COLUMNS}",
            (
                DELIVERING,
                uuid.uuid4().hex,
                now + lease_s,
                PENDING,
                now,
                DELIVERING,
                now,
                *owners,
                limit,
            ),
        )
        return [_from_row(row) for row in rows]

    def settle(self, callback: Callback) -> bool:
        rows = self._run(
            f"UPDATE {self._table} SET state = ?, attempts = ?, next_attempt_at = ?, "
            "lease = NULL, lease_until = NULL WHERE id = ? AND lease = ? RETURNING id",
            (
                callback.state,
                json.dumps(list(callback.attempts)),
                callback.next_attempt_at,
                callback.id,
                callback.lease,
            ),
        )
        return bool(rows)

    def sweep(self, created_before: float) -> int:
        rows = self._run(
            f"DELETE FROM {self._table} WHERE id IN (SELECT c.id FROM {self._table} c "
            f"WHERE c.created_at < ? AND NOT ({self._exists})) RETURNING id",
            (created_before,),
        )
        return len(rows)


def outbox_for(store: JobStore) -> Outbox:
    """The outbox that lives in `store`."""
    from host.services.store import MemoryJobStore

    if isinstance(store, MemoryJobStore):
        return MemoryOutbox(store)
    return SqlOutbox(store)


__all__ = [
    "DELIVERED",
    "DELIVERING",
    "FAILED",
    "KINDS",
    "PENDING",
    "PG_TABLES",
    "Callback",
    "MemoryOutbox",
    "Outbox",
    "SqlOutbox",
    "new_callback",
    "outbox_for",
]
