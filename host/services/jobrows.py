"""The job record every store keeps, and the rules every store applies to it.

    Job ──new_row / update_row──▶ a row (the same columns in every store)
    row ──job_from_row──▶ Job        row ──document──▶ public JSON, result unparsed

    JobStore (the contract; jobs.py relies on nothing else)
      │  _rows(): the store's rows, held under its lock or in one transaction
      ▼
    Rows ── insert, update, job, raw, payload            (one row)
         ── insert (None on a held key), keyed ──▶ add    (idempotency keys)
         ── admit(rows), then insert           ──▶ add    (a quota and its insert, at once)
         ── count, newest            ──▶ fill_page       (a listing)
         ── usage, finished, delete  ──▶ prune_owner     (an owner's quotas)
         ── expired, delete          ──▶ prune           (retention)
         ── size_bytes, finished     ──▶ prune_to_size   (the store's size)

The rules are written here once: which jobs a page holds, which finished
jobs go when an owner is over its quota of jobs or bytes, when a finished
job is past retention, which go when the store is too big. A store only
answers the `Rows` questions: `MemoryJobStore` from dicts (store.py), the
SQLite and PostgreSQL stores with one set of statements (jobsql.py).

A job may be stored under an idempotency key (`Idempotency`): the store
holds one job per (owner, key) and refuses a second in the same write, so
racing requests cannot both create one; the key goes with its job's row.

A job's input is stored apart from its record, the image as raw bytes, and
dropped when the job finishes. Every row knows how many bytes it stores
(input, result and error): that is what an owner's byte quota counts.
"""

from __future__ import annotations

import abc
import base64
import enum
import json
from collections.abc import Callable, Generator, Iterable, Sequence
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol

ANONYMOUS = "anonymous"
# The columns of a job's record, in the order of `new_row` and `job_from_row`.
COLUMNS = (
    "id, plugin, status, created_at, started_at, finished_at, result, error, owner, stored_bytes"
)


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


@dataclass(frozen=True)
class JobFilter:
    """A listing's filters; None matches any value."""

    owner: str | None = None
    status: JobStatus | None = None
    plugin: str | None = None

    def terms(self) -> list[tuple[str, str]]:
        """`(column, value)` of each filter that is set."""
        named = (("owner", self.owner), ("status", self.status), ("plugin", self.plugin))
        return [(column, str(value)) for column, value in named if value is not None]

    def matches(self, job: Job) -> bool:
        return all(str(getattr(job, column)) == value for column, value in self.terms())


@dataclass(frozen=True)
class Idempotency:
    """The client's idempotency key of a new job and the digest of its
    request: a second request with the key gets the job stored first."""

    key: str
    digest: str


# A job held by an idempotency key, and the digest of the request that created it.
Keyed = tuple["Job", str]

# A check run on the rows held for a new job's insert, before it (an owner's
# quota, read, pruned and checked in the insert's own transaction): raising
# stores nothing.
Admit = Callable[["Rows"], None]

# A job as a listing reads it: the record without its result and error,
# and those two as the JSON text they are stored as.
RawJob = tuple[Job, str | None, str | None]


# -- the row --------------------------------------------------------------


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


def to_json(value: dict[str, Any] | None) -> str | None:
    """A result or error as it is stored. ASCII only, so a document's length
    in characters is its length in bytes."""
    return None if value is None else json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def record_bytes(result: str | None, error: str | None) -> int:
    """The bytes a finished job stores: its result and error."""
    return len(result or "") + len(error or "")


def raw_job(job: Job) -> RawJob:
    return replace(job, result=None, error=None), to_json(job.result), to_json(job.error)


def document(job: Job, result: str | None, error: str | None) -> str:
    """The public document of `job` with its stored result and error spliced in
    as they are: no parsing, so a page costs its size and no more."""
    public = {k: v for k, v in job.public().items() if k not in ("result", "error")}
    head = json.dumps(public, separators=(",", ":"))
    return f'{head[:-1]},"result":{result or "null"},"error":{error or "null"}}}'


def job_from_row(row: Sequence[Any], parse: bool = True) -> Job:
    """The Job of a row's first nine columns, in the order of `COLUMNS`;
    without `parse`, its result and error are left None."""
    return Job(
        id=row[0],
        plugin=row[1],
        status=JobStatus(row[2]),
        created_at=row[3],
        started_at=row[4],
        finished_at=row[5],
        result=None if row[6] is None or not parse else json.loads(row[6]),
        error=None if row[7] is None or not parse else json.loads(row[7]),
        owner=row[8],
    )


class Row(NamedTuple):
    """A job's row: `COLUMNS`, then its input (metadata JSON and raw image)."""

    id: str
    plugin: str
    status: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    result: str | None
    error: str | None
    owner: str
    stored_bytes: int
    payload: str | None
    image: bytes | None
    idem_key: str | None
    request_hash: str | None


def new_row(job: Job, payload: dict[str, Any] | None, idem: Idempotency | None = None) -> Row:
    """A new job's row. Every store keeps the same record: the input as raw
    bytes plus its metadata, the bytes it stores counted for the owner's
    quota, and its idempotency key if it has one. A job stored only once
    finished (`payload` None) keeps no input."""
    image, meta = encode_payload(payload) if payload is not None else (None, None)
    result, error = to_json(job.result), to_json(job.error)
    stored = len(image or b"") + len(meta or "") + record_bytes(result, error)
    return Row(
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
        None if idem is None else idem.key,
        None if idem is None else idem.digest,
    )


def interrupted(job: Job, reason: dict[str, Any]) -> Job:
    """`job` ended INTERRUPTED now, with `reason` as its error."""
    return replace(job, status=JobStatus.INTERRUPTED, finished_at=now_iso(), error=reason)


# -- the rules ------------------------------------------------------------


class Rows(Protocol):
    """A store's job rows, held for one operation (under the store's lock,
    or in one transaction). What each answer means is the contract every
    store keeps; the rules below are built from these answers alone."""

    def insert(self, job: Job, payload: dict[str, Any] | None, idem: Idempotency | None) -> bool:
        """Store a new job (`new_row`); its input, if given, apart. False,
        storing nothing, when its owner holds a job under `idem`'s key
        already (the store refuses it in the same write)."""

    def keyed(self, owner: str, key: str) -> Keyed | None:
        """The job `owner` stored under idempotency key `key`, and its digest."""

    def update(self, job: Job) -> None:
        """Write status, times, result and error; a finished job's input is
        dropped and its stored bytes become `record_bytes`."""

    def job(self, job_id: str) -> Job | None: ...

    def raw(self, job_id: str) -> RawJob | None: ...

    def payload(self, job_id: str) -> dict[str, Any] | None: ...

    def count(self, where: JobFilter) -> int: ...

    def newest(self, where: JobFilter, limit: int, offset: int) -> Generator[RawJob, None, None]:
        """The matching jobs, newest (by created_at) first, from `offset`."""

    def usage(self, owner: str) -> Usage: ...

    def finished(self, owner: str | None) -> Generator[tuple[str, int], None, None]:
        """`(id, stored bytes)` of the finished jobs (of `owner`, or of all),
        oldest (by created_at) first."""

    def expired(self, cutoff: str) -> list[str]:
        """Ids of the finished jobs that finished (or, with no finish time,
        were created) before `cutoff`."""

    def delete(self, job_ids: Sequence[str]) -> None: ...

    def size_bytes(self) -> int:
        """What the store counts against `max_db_bytes`."""


def fill_page(rows: Rows, where: JobFilter, limit: int, offset: int, max_bytes: int) -> JobPage:
    """At most `limit` jobs matching `where` from `offset`, newest first,
    within `max_bytes` of documents (see JobPage). At most one row past the
    byte cap is read."""
    total = rows.count(where)
    documents: list[str] = []
    used = 0
    truncated = False
    with closing(rows.newest(where, limit, offset)) as found:
        for job, result, error in found:
            if len(documents) == limit:
                break
            text = document(job, result, error)
            if documents and used + len(text) + 1 > max_bytes:
                truncated = True
                break
            documents.append(text)
            used += len(text) + 1  # the comma between documents
    end = offset + len(documents)
    return JobPage(documents, total, end if end < total else None, truncated)


def oldest_to_drop(
    finished: Iterable[tuple[str, int]], jobs: int, stored: int, max_jobs: int, max_bytes: int
) -> list[str]:
    """Ids of the finished jobs (`(id, stored bytes)`, oldest first) an owner
    of `jobs` jobs and `stored` bytes drops to keep at most `max_jobs` and
    `max_bytes`. When they are not enough, all of them: the owner's
    unfinished jobs alone are over, and the caller refuses the new job."""
    victims = []
    for job_id, size in finished:
        if jobs <= max_jobs and stored <= max_bytes:
            break
        victims.append(job_id)
        jobs -= 1
        stored -= size
    return victims


def prune_owner(rows: Rows, owner: str, max_jobs: int, max_bytes: int) -> int:
    """Drop `owner`'s oldest finished jobs until it keeps at most `max_jobs`
    jobs and `max_bytes`; return how many went. Its other jobs stay."""
    usage = rows.usage(owner)
    if usage.jobs <= max_jobs and usage.stored_bytes <= max_bytes:
        return 0
    # Read oldest first, only as far as needed: a client at its quota drops
    # a few jobs per new one, not a scan of all it keeps.
    with closing(rows.finished(owner)) as finished:
        victims = oldest_to_drop(finished, usage.jobs, usage.stored_bytes, max_jobs, max_bytes)
    rows.delete(victims)
    return len(victims)


def retention_cutoff(older_than_s: float) -> str:
    """The time before which a finished job is past retention."""
    return (datetime.now(UTC) - timedelta(seconds=older_than_s)).isoformat()


def prune_expired(rows: Rows, older_than_s: float) -> int:
    """Drop the finished jobs that finished more than `older_than_s` ago;
    return how many went."""
    victims = rows.expired(retention_cutoff(older_than_s))
    rows.delete(victims)
    return len(victims)


def prune_to_size(rows: Rows, max_bytes: int) -> int:
    """Drop the oldest finished jobs until the store's size is at most
    `max_bytes` (or no finished job is left); return how many went.

    The size is measured again after each round: a store on pages (SQLite)
    may give back less than the bytes its rows held."""
    pruned = 0
    while (excess := rows.size_bytes() - max_bytes) > 0:
        victims = []
        with closing(rows.finished(None)) as finished:
            for job_id, size in finished:
                victims.append(job_id)
                excess -= size
                if excess <= 0:
                    break
        if not victims:
            break
        rows.delete(victims)
        pruned += len(victims)
    return pruned


def add_keyed(
    rows: Rows, job: Job, payload: dict[str, Any] | None, idem: Idempotency | None
) -> Keyed | None:
    """Insert `job`; None when stored, else the job holding `idem`'s key.

    A key's job may be deleted between the refused insert and the read
    (another transaction pruned it): the insert is tried again then."""
    for _ in range(3):
        if rows.insert(job, payload, idem):
            return None
        assert idem is not None  # only a held key refuses an insert
        held = rows.keyed(job.owner, idem.key)
        if held is not None:
            return held
    raise RuntimeError(f"idempotency key of job {job.id} neither free nor held")


class JobStore(abc.ABC):
    """Where jobs live: the contract every store keeps, written once over
    the store's `Rows`. A store gives `_rows()`, `_reclaim()`, `recover()`
    and `close()`."""

    @abc.abstractmethod
    def _rows(self) -> AbstractContextManager[Rows]:
        """The store's rows, held (locked, or in a transaction) until exit."""

    @abc.abstractmethod
    def recover(self, reason: dict[str, Any]) -> int:
        """At start-up: end the jobs the last process left unfinished as
        INTERRUPTED with `reason`; return how many."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def _reclaim(self) -> None:
        """Called with the rows held after a prune by age or size dropped
        jobs: give their space back."""

    def add(
        self,
        job: Job,
        payload: dict[str, Any] | None,
        idem: Idempotency | None = None,
        admit: Admit | None = None,
    ) -> Keyed | None:
        """Store a new job and its input (None: a finished job, no input),
        under idempotency key `idem` if given. Returns None when stored; the
        job its owner stored under that key already (and that request's
        digest) when not, storing nothing.

        `admit` runs first on the same rows, held for the insert: no other
        job of the owner is stored between its reads and the insert. What
        it raises is raised, and the job is not stored."""
        with self._rows() as rows:
            if admit is not None:
                admit(rows)
            return add_keyed(rows, job, payload, idem)

    def check(self, admit: Admit) -> None:
        """Run `admit` on the rows held as for an insert, storing nothing."""
        with self._rows() as rows:
            admit(rows)

    def keyed(self, owner: str, key: str) -> Keyed | None:
        """The job `owner` stored under idempotency key `key`, and its digest."""
        with self._rows() as rows:
            return rows.keyed(owner, key)

    def get(self, job_id: str) -> Job | None:
        with self._rows() as rows:
            return rows.job(job_id)

    def payload(self, job_id: str) -> dict[str, Any] | None:
        """The job's input, or None once it finished (or if there is no such job)."""
        with self._rows() as rows:
            return rows.payload(job_id)

    def document(self, job_id: str) -> tuple[str, str] | None:
        """`(owner, public document)` of the job, its result spliced in unparsed, or None."""
        with self._rows() as rows:
            found = rows.raw(job_id)
        return None if found is None else (found[0].owner, document(*found))

    def update(self, job: Job) -> None:
        """Write the job's status, times, result and error; a finished job's
        input is deleted with it."""
        with self._rows() as rows:
            rows.update(job)

    def page(
        self,
        owner: str | None,
        status: JobStatus | None,
        plugin: str | None,
        limit: int,
        offset: int,
        max_bytes: int,
    ) -> JobPage:
        """The jobs matching the filters (None: any), newest first: see JobPage."""
        with self._rows() as rows:
            return fill_page(rows, JobFilter(owner, status, plugin), limit, offset, max_bytes)

    def usage(self, owner: str) -> Usage:
        with self._rows() as rows:
            return rows.usage(owner)

    def prune_owner(self, owner: str, max_jobs: int, max_bytes: int) -> int:
        """Delete `owner`'s oldest finished jobs until it keeps at most
        `max_jobs` jobs and `max_bytes`; return how many went. The space is
        reused by the jobs that follow (no reclaim on this path)."""
        with self._rows() as rows:
            return prune_owner(rows, owner, max_jobs, max_bytes)

    def size_bytes(self) -> int:
        with self._rows() as rows:
            return rows.size_bytes()

    def prune(self, older_than_s: float) -> int:
        """Delete the finished jobs past retention; return how many went."""
        with self._rows() as rows:
            pruned = prune_expired(rows, older_than_s)
            if pruned:
                self._reclaim()
        return pruned

    def prune_to_size(self, max_bytes: int) -> int:
        """Delete the oldest finished jobs until the store uses at most
        `max_bytes` (or no finished job is left); return how many went."""
        with self._rows() as rows:
            pruned = prune_to_size(rows, max_bytes)
            if pruned:
                self._reclaim()
        return pruned
