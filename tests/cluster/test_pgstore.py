"""What only the shared job store does: queue a job in the transaction that
stores it, declare no job dead at start-up, and answer a database outage
with a clear error. The contract it shares with the other stores (records,
pages, quotas, pruning) is tests/host/services/test_store_contract.py."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from host.cluster.pgstore import DatabaseUnavailable, PgJobStore, open_pool
from host.cluster.schema import ensure_schema
from host.services.batchrows import Batch
from host.services.store import Job, JobStatus, now_iso
from tests.cluster.conftest import CLUSTER
from tests.cluster.pg import free_port
from tests.host.services.test_store_contract import PAYLOAD, job

pytestmark = CLUSTER


@pytest.fixture
def store(db_url: str) -> Iterator[PgJobStore]:
    ensure_schema(db_url)
    pool = open_pool(db_url, max_size=2)
    yield PgJobStore(pool)
    pool.close()


def test_the_shared_store_declares_no_job_dead_at_start_up(store: PgJobStore) -> None:
    # Another node may be running it: stalled jobs are found by the workers'
    # recovery step (tests/cluster/test_faults.py), not by a node starting.
    store.add(job(1), PAYLOAD)
    store.update(replace(job(1), status=JobStatus.RUNNING, started_at=now_iso()))
    assert store.recover({"reason": "interrupted"}) == 0
    found = store.get("job0001")
    assert found is not None and found.status is JobStatus.RUNNING
    assert store.payload("job0001") == PAYLOAD


def test_a_new_job_is_stored_and_queued_in_one_transaction(store: PgJobStore) -> None:
    def refuse(conn: Any, pending: Job, priority: int) -> int:
        raise RuntimeError("the queue refused it")

    store.dispatch = refuse
    with pytest.raises(RuntimeError):
        store.add(job(2), PAYLOAD)
    assert store.get("job0002") is None  # not stored when it could not be queued
    store.dispatch = lambda conn, pending, priority: 42
    store.add(job(3), PAYLOAD)
    with store.connection() as conn:
        row = conn.execute("SELECT queue_job_id FROM plughost_jobs WHERE id = 'job0003'")
        assert row.fetchone() == (42,)


def test_a_batch_is_stored_and_queued_in_one_transaction(store: PgJobStore) -> None:
    items = [job(n) for n in range(10, 15)]
    batch = Batch("b1", "alice", "echo", now_iso(), tuple(j.id for j in items))
    queued: list[tuple[str, int]] = []

    def third_refused(conn: Any, pending: Job, priority: int) -> int:
        if len(queued) == 2:
            raise RuntimeError("the queue refused it")
        queued.append((pending.id, priority))
        return len(queued)

    store.dispatch = third_refused
    with pytest.raises(RuntimeError), store.batch_rows() as rows:
        rows.insert(batch, [(j, PAYLOAD) for j in items], None)
    assert all(store.get(j.id) is None for j in items)
    with store.batch_rows() as rows:
        assert rows.batch("b1") is None
    queued.clear()
    store.dispatch = lambda conn, pending, priority: queued.append((pending.id, priority)) or 7
    with store.batch_rows() as rows:
        assert rows.insert(batch, [(j, PAYLOAD) for j in items], None)
    assert queued == [(j.id, -n) for n, j in enumerate(items)]
    finished = replace(job(4), status=JobStatus.SUCCESS, finished_at=now_iso())
    store.add(finished, None)  # a finished job is not queued
    with store.connection() as conn:
        row = conn.execute("SELECT queue_job_id FROM plughost_jobs WHERE id = 'job0004'")
        assert row.fetchone() == (None,)


def test_an_unreachable_database_is_a_clear_error():
    pool = open_pool(f"postgresql://nobody@127.0.0.1:{free_port()}/none", timeout_s=1)
    try:
        with pytest.raises(DatabaseUnavailable) as failed:
            PgJobStore(pool).get("x")
        assert failed.value.reason == "database_unavailable"
        assert failed.value.envelope["error"]["details"]["retry_after_s"] > 0
    finally:
        pool.close()


def test_batch_items_are_queued_after_their_owners_pending_jobs(store: PgJobStore) -> None:
    queued: dict[str, int] = {}

    def record(conn: Any, pending: Job, priority: int) -> int:
        queued[pending.id] = priority
        return len(queued)

    store.dispatch = record

    def insert(name: str, owner: str, numbers: range) -> list[Job]:
        items = [job(n, owner) for n in numbers]
        batch = Batch(name, owner, "echo", now_iso(), tuple(j.id for j in items))
        with store.batch_rows() as rows:
            assert rows.insert(batch, [(j, PAYLOAD) for j in items], None)
        return items

    first = insert("a1", "alice", range(0, 5))
    second = insert("a2", "alice", range(5, 10))
    bobs = insert("b1", "bob", range(10, 13))
    assert [queued[j.id] for j in first] == [0, -1, -2, -3, -4]
    # Alice's second batch waits behind her first; Bob's first does not.
    assert [queued[j.id] for j in second] == [-5, -6, -7, -8, -9]
    assert [queued[j.id] for j in bobs] == [0, -1, -2]
