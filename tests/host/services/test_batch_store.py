"""One batch contract, three stores (memory, SQLite, PostgreSQL): a batch
and its items are stored together or not at all, one batch per idempotency
key, and its end is decided once, however many callers ask at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from host.errors import IdempotencyConflict
from host.services.batchrows import Batch, batch_ended, job_ended, rows_of
from host.services.jobrows import Idempotency, JobStore
from host.services.store import Job, JobStatus, now_iso
from tests.host.services.test_store_contract import PAYLOAD, finish, job


def new_batch(name: str, count: int, owner: str = "alice") -> tuple[Batch, list[Job]]:
    jobs = [job(n, owner) for n in range(count)]
    jobs = [Job(f"{name}-{j.id}", j.plugin, j.status, j.created_at, owner=owner) for j in jobs]
    return Batch(name, owner, "echo", now_iso(), tuple(j.id for j in jobs)), jobs


def add(store: JobStore, batch: Batch, jobs: list[Job], idem: Idempotency | None = None) -> bool:
    with rows_of(store) as rows:
        return rows.insert(batch, [(j, dict(PAYLOAD)) for j in jobs], idem)


def test_a_batch_and_its_items_are_stored_together(store: JobStore) -> None:
    batch, jobs = new_batch("b1", 3)
    assert add(store, batch, jobs)
    with rows_of(store) as rows:
        assert rows.batch("b1") == batch
        assert rows.counts("b1") == {"PENDING": 3}
        assert [rows.batch_of(j.id) for j in jobs] == ["b1"] * 3
        assert rows.count("alice") == 1 and rows.count("bob") == 0
        assert [b.id for b in rows.newest(None, 10, 0)] == ["b1"]
    assert store.payload(jobs[0].id) is not None
    assert store.usage("alice").jobs == 3


def test_a_failing_insert_stores_nothing_of_the_batch(store: JobStore) -> None:
    batch, jobs = new_batch("b1", 3)
    jobs[2] = jobs[0]  # the same job twice: the store refuses the third insert
    with pytest.raises(Exception):  # noqa: B017, PT011 (each store's own integrity error)
        add(store, batch, jobs)
    with rows_of(store) as rows:
        assert rows.batch("b1") is None
    assert store.get(jobs[0].id) is None and store.usage("alice").jobs == 0


def test_one_batch_per_idempotency_key(store: JobStore) -> None:
    first, jobs = new_batch("b1", 2)
    second, others = new_batch("b2", 2)
    assert add(store, first, jobs, Idempotency("k", "d1"))
    assert not add(store, second, others, Idempotency("k", "d2"))
    with rows_of(store) as rows:
        assert rows.keyed("alice", "k") == (first, "d1")
        assert rows.batch("b2") is None and rows.keyed("bob", "k") is None
    assert store.get(others[0].id) is None


def test_a_key_a_job_of_its_own_holds_refuses_the_batch_storing_nothing(
    store: JobStore,
) -> None:
    single = job(9, "alice")
    assert store.add(single, dict(PAYLOAD), Idempotency("k", "job-digest")) is None
    batch, jobs = new_batch("b1", 2)
    with pytest.raises(IdempotencyConflict) as refused:
        add(store, batch, jobs, Idempotency("k", "batch-digest"))
    assert refused.value.envelope["error"]["details"]["job_id"] == single.id
    with rows_of(store) as rows:
        assert rows.batch("b1") is None and rows.keyed("alice", "k") is None
    assert store.get(jobs[0].id) is None and store.usage("alice").jobs == 1
    # A batch's key is held for POST /v1/jobs too: its first item holds it.
    other, items = new_batch("b2", 2)
    assert add(store, other, items, Idempotency("k2", "batch-digest"))
    held = store.keyed("alice", "k2")
    assert held is not None and held[0].id == items[0].id and held[1] == "batch-digest"


def test_a_batch_ends_once_when_its_last_item_ends(store: JobStore) -> None:
    batch, jobs = new_batch("b1", 3)
    add(store, batch, jobs)
    finish(store, jobs[0])
    finish(store, jobs[1], status=JobStatus.FAILED, result=None, error={"message": "x"})
    assert not job_ended(store, jobs[1].id)  # one item left
    finish(store, jobs[2])
    assert job_ended(store, jobs[2].id)
    assert not batch_ended(store, "b1") and not job_ended(store, jobs[2].id)
    with rows_of(store) as rows:
        assert rows.counts("b1") == {"SUCCESS": 2, "FAILED": 1}
        ended = rows.batch("b1")
    assert ended is not None and ended.finished_at is not None


def test_of_many_callers_at_once_exactly_one_ends_the_batch(store: JobStore) -> None:
    batch, jobs = new_batch("b1", 8)
    add(store, batch, jobs)
    for pending in jobs:
        finish(store, pending)
    start = threading.Barrier(8)

    def end(pending: Job) -> bool:
        start.wait(timeout=10)
        return job_ended(store, pending.id)

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(end, jobs)) == [False] * 7 + [True]


def test_a_job_of_its_own_ends_no_batch(store: JobStore) -> None:
    single = job(99)
    store.add(single, dict(PAYLOAD))
    finish(store, single)
    assert not job_ended(store, single.id)


def test_ended_batches_without_items_left_are_pruned_and_free_their_key(store: JobStore) -> None:
    done, done_jobs = new_batch("b1", 2)
    kept, kept_jobs = new_batch("b2", 2, owner="bob")
    add(store, done, done_jobs, Idempotency("k", "d1"))
    add(store, kept, kept_jobs)
    with rows_of(store) as rows:
        assert sorted(rows.unended()) == ["b1", "b2"]
    for pending in done_jobs + kept_jobs:
        finish(store, pending)
    assert batch_ended(store, "b1") and batch_ended(store, "b2")
    with rows_of(store) as rows:
        assert rows.unended() == []
    assert store.prune_owner("alice", 0, 0) == 2  # b1's jobs go, b2's stay
    with rows_of(store) as rows:
        assert rows.prune("9999") == 1
        assert rows.batch("b1") is None and rows.batch("b2") is not None
        assert rows.keyed("alice", "k") is None
    again, again_jobs = new_batch("b3", 1)
    assert add(store, again, again_jobs, Idempotency("k", "d3"))
