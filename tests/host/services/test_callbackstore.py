"""One outbox contract, three stores (memory, SQLite, PostgreSQL): a callback
is due only once its job (or its batch) has ended; a claim holds it under a lease no
other claim takes until it expires; only the lease's holder settles it;
callbacks of pruned jobs are swept."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from host.services.batchrows import Batch, batch_ended, rows_of
from host.services.callbackstore import (
    DELIVERED,
    DELIVERING,
    PENDING,
    new_callback,
    outbox_for,
)
from host.services.jobrows import JobStore
from tests.host.services.test_store_contract import PAYLOAD, finish, job


def test_a_callback_is_due_only_once_its_job_has_ended(store: JobStore) -> None:
    outbox = outbox_for(store)
    store.add(job(1), PAYLOAD)
    callback = new_callback("alice", "job", "job0001", "https://hooks.example.com/x", 100.0)
    outbox.add(callback)
    assert outbox.claim(200.0, 30.0, 10) == []  # the job still runs
    finish(store, job(1))
    (claimed,) = outbox.claim(200.0, 30.0, 10)
    assert claimed.id == callback.id and claimed.state == DELIVERING and claimed.lease
    found = outbox.of_subject("job", "job0001")
    assert found is not None and found.state == DELIVERING
    assert set(outbox.of_subjects("job", ["job0001", "job0002"])) == {"job0001"}
    assert outbox.of_subjects("job", []) == {}


def test_a_held_lease_is_not_claimed_again_until_it_expires(store: JobStore) -> None:
    outbox = outbox_for(store)
    for n in range(1, 9):
        store.add(job(n), PAYLOAD)
        finish(store, job(n))
        outbox.add(new_callback("alice", "job", f"job{n:04d}", "https://h.example/x", 100.0))
    with ThreadPoolExecutor(4) as pool:
        rounds = list(pool.map(lambda _: outbox.claim(200.0, 30.0, 3), range(4)))
    ids = [c.id for claimed in rounds for c in claimed]
    assert len(ids) == len(set(ids)) == 8  # every callback once, none twice
    assert outbox.claim(210.0, 30.0, 10) == []  # leases held until 230
    again = outbox.claim(231.0, 30.0, 10)  # a node that died: its leases expired
    assert len(again) == 8
    stale = next(c for claimed in rounds for c in claimed)
    assert not outbox.settle(replace(stale, state=DELIVERED))  # its lease is gone
    fresh = next(c for c in again if c.id == stale.id)
    attempt = {"at": "t", "duration_ms": 1.0, "status": 200}
    assert outbox.settle(replace(fresh, state=DELIVERED, attempts=(attempt,)))
    found = outbox.of_subject("job", fresh.subject_id)
    assert found is not None and found.state == DELIVERED and found.attempts == (attempt,)


def test_a_retry_is_due_at_its_next_attempt(store: JobStore) -> None:
    outbox = outbox_for(store)
    store.add(job(1), PAYLOAD)
    finish(store, job(1))
    outbox.add(new_callback("alice", "job", "job0001", "https://h.example/x", 100.0))
    (claimed,) = outbox.claim(100.0, 30.0, 1)
    failed = {"at": "t", "duration_ms": 1.0, "status": 500, "error": "answered 500"}
    assert outbox.settle(replace(claimed, state=PENDING, attempts=(failed,), next_attempt_at=150))
    assert outbox.claim(149.0, 30.0, 1) == []
    (retried,) = outbox.claim(150.0, 30.0, 1)
    assert retried.attempts == (failed,)


def test_callbacks_of_pruned_jobs_are_swept(store: JobStore) -> None:
    outbox = outbox_for(store)
    for n in (1, 2):
        store.add(job(n), PAYLOAD)
        finish(store, job(n))
        outbox.add(new_callback("alice", "job", f"job{n:04d}", "https://h.example/x", 100.0))
    store.prune_owner("alice", 1, 1 << 30)  # job0001 goes
    assert outbox.sweep(50.0) == 0  # too recent
    assert outbox.sweep(150.0) == 1
    assert outbox.of_subject("job", "job0001") is None
    assert outbox.of_subject("job", "job0002") is not None


def test_a_batch_callback_is_due_only_once_the_batch_has_ended(store: JobStore) -> None:
    outbox = outbox_for(store)
    items = [job(1), job(2)]
    batch = Batch("batch01", "alice", "echo", items[0].created_at, ("job0001", "job0002"))
    with rows_of(store) as rows:
        assert rows.insert(batch, [(item, PAYLOAD) for item in items], None)
    callback = new_callback("alice", "batch", "batch01", "https://hooks.example.com/b", 100.0)
    outbox.add(callback)
    assert outbox.claim(200.0, 30.0, 10) == []  # no item ended
    finish(store, items[0])
    assert outbox.claim(200.0, 30.0, 10) == []  # one item still runs
    finish(store, items[1])
    assert outbox.claim(200.0, 30.0, 10) == []  # every item ended, the batch not yet
    assert batch_ended(store, "batch01")
    (claimed,) = outbox.claim(200.0, 30.0, 10)
    assert claimed.id == callback.id and claimed.subject_kind == "batch"
    found = outbox.of_subject("batch", "batch01")
    assert found is not None and found.state == DELIVERING
    assert outbox.of_subject("job", "batch01") is None
    assert outbox.sweep(150.0) == 0  # its batch exists


def test_a_callback_of_a_batch_never_stored_is_swept(store: JobStore) -> None:
    outbox = outbox_for(store)
    outbox.add(new_callback("alice", "batch", "nobatch", "https://h.example/x", 100.0))
    assert outbox.claim(200.0, 30.0, 10) == []
    assert outbox.sweep(150.0) == 1
    assert outbox.of_subject("batch", "nobatch") is None
