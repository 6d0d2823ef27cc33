"""One contract, three stores: every job store (memory, SQLite, PostgreSQL)
keeps the same records, pages, quotas and pruning. Each test runs against
each store; what only one store does is tested beside it
(test_store_bounds.py, tests/cluster/test_pgstore.py)."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from host.errors import JobNotFound, QuotaExceeded
from host.registry import PluginRegistry
from host.services import JobLimits, JobManagementService, PluginManagementService
from host.services.jobrows import Idempotency, JobStore
from host.services.store import Job, JobStatus, now_iso
from sandbox.supervisor import Sandbox
from tests.conftest import make_png

PNG = make_png(8, 8)
PAYLOAD = {"image": PNG, "mime_type": "image/png", "options": {"k": 1}}
# What PAYLOAD stores: the raw image and the JSON of the other fields.
INPUT_BYTES = len(PNG) + len(json.dumps({"mime_type": "image/png", "options": {"k": 1}}))


def job(n: int, owner: str = "alice", plugin: str = "echo") -> Job:
    """The n-th job: a later n is a newer job."""
    return Job(
        id=f"job{n:04d}",
        plugin=plugin,
        status=JobStatus.PENDING,
        created_at=f"2026-01-01T00:{n // 60:02d}:{n % 60:02d}+00:00",
        owner=owner,
    )


def finish(store: JobStore, pending: Job, size: int = 10, **changes: Any) -> Job:
    """End `pending` with a result of about `size` bytes."""
    ended = {"status": JobStatus.SUCCESS, "finished_at": now_iso(), "result": {"x": "y" * size}}
    done = replace(pending, **{**ended, **changes})
    store.update(done)
    return done


def listed(store: JobStore, owner: str | None = None, **filters: Any) -> list[str]:
    page = store.page(owner, filters.get("status"), filters.get("plugin"), 100, 0, 1 << 20)
    return [json.loads(document)["id"] for document in page.documents]


# -- one job ----------------------------------------------------------------


def test_a_job_and_its_input_round_trip_and_the_input_goes_when_it_ends(store: JobStore) -> None:
    store.add(job(1), PAYLOAD)
    assert store.get("job0001") == job(1)
    assert store.payload("job0001") == PAYLOAD
    done = finish(store, job(1))
    assert store.get("job0001") == done
    assert store.payload("job0001") is None
    owner, document = store.document("job0001")  # type: ignore[misc]
    assert owner == "alice"
    assert json.loads(document) == done.public()


def test_a_base64_image_is_stored_as_its_bytes(store: JobStore) -> None:
    store.add(job(1), {**PAYLOAD, "image": base64.b64encode(PNG).decode()})
    assert store.payload("job0001") == PAYLOAD
    assert store.usage("alice").stored_bytes == INPUT_BYTES


def test_a_job_moves_through_its_statuses(store: JobStore) -> None:
    store.add(job(1), PAYLOAD)
    running = replace(job(1), status=JobStatus.RUNNING, started_at=now_iso())
    store.update(running)
    assert store.get("job0001") == running
    assert store.payload("job0001") == PAYLOAD  # a running job still has its input
    failed = replace(
        running, status=JobStatus.FAILED, finished_at=now_iso(), error={"reason": "timeout"}
    )
    store.update(failed)
    assert store.get("job0001") == failed and store.payload("job0001") is None


def test_a_finished_job_can_be_stored_in_one_write(store: JobStore) -> None:
    done = replace(job(1), status=JobStatus.SUCCESS, finished_at=now_iso(), result={"a": 1})
    store.add(done, None)
    assert store.get("job0001") == done and store.payload("job0001") is None
    assert store.usage("alice").stored_bytes == len('{"a":1}')


def test_an_unknown_job_is_not_found_and_its_update_stores_nothing(store: JobStore) -> None:
    assert store.get("missing") is None
    assert store.document("missing") is None and store.payload("missing") is None
    finish(store, job(7))
    assert store.get("job0007") is None and store.usage("alice").jobs == 0


# -- listing ------------------------------------------------------------------


def test_listing_filters_by_owner_status_and_plugin_newest_first(store: JobStore) -> None:
    store.add(job(1, "alice", "echo"), PAYLOAD)
    store.add(job(2, "bob", "echo"), PAYLOAD)
    store.add(job(3, "alice", "nap"), PAYLOAD)
    store.add(job(4, "alice", "echo"), PAYLOAD)
    finish(store, job(4, "alice", "echo"))
    assert listed(store) == ["job0004", "job0003", "job0002", "job0001"]
    assert listed(store, "alice") == ["job0004", "job0003", "job0001"]
    assert listed(store, "alice", plugin="echo") == ["job0004", "job0001"]
    assert listed(store, "alice", status=JobStatus.PENDING) == ["job0003", "job0001"]
    assert listed(store, None, status=JobStatus.SUCCESS, plugin="nap") == []
    assert listed(store, "carol") == []


def test_pages_by_limit_and_offset_list_every_job_once(store: JobStore) -> None:
    for n in range(7):
        store.add(job(n), PAYLOAD)
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = store.page("alice", None, None, 3, offset, 1 << 20)
        assert page.total == 7 and not page.truncated
        seen += [json.loads(d)["id"] for d in page.documents]
        offset = page.next_offset
    assert seen == [f"job{n:04d}" for n in reversed(range(7))]
    last = store.page("alice", None, None, 3, 6, 1 << 20)
    assert len(last.documents) == 1 and last.next_offset is None
    assert store.page("alice", None, None, 3, 9, 1 << 20).documents == []


def test_the_byte_cap_ends_a_page_but_a_page_always_holds_a_job(store: JobStore) -> None:
    for n in range(4):
        store.add(job(n), PAYLOAD)
        finish(store, job(n), size=1000)
    one = len(store.page("alice", None, None, 1, 0, 1 << 20).documents[0])
    page = store.page("alice", None, None, 10, 0, 2 * one + 2)
    assert len(page.documents) == 2 and page.truncated and page.next_offset == 2
    assert sum(len(d) + 1 for d in page.documents) <= 2 * one + 2
    alone = store.page("alice", None, None, 10, 0, 10)
    assert len(alone.documents) == 1 and alone.truncated and alone.next_offset == 1
    by_count = store.page("alice", None, None, 2, 0, 1 << 20)
    assert len(by_count.documents) == 2 and not by_count.truncated


# -- owners -------------------------------------------------------------------


@pytest.fixture
def service(
    store: JobStore, registry: PluginRegistry, sandbox: Sandbox
) -> Iterator[JobManagementService]:
    limits = JobLimits(max_jobs_per_client=3)
    jobs = JobManagementService(PluginManagementService(registry, sandbox), store, limits=limits)
    yield jobs
    jobs.shutdown(timeout_s=5)


def test_another_owners_job_is_not_found(service: JobManagementService, payload: dict) -> None:
    mine = service.create_job("image_info", payload, owner="alice")
    assert service.get_job(mine.id, owner="alice") == mine
    with pytest.raises(JobNotFound):
        service.get_job(mine.id, owner="bob")
    with pytest.raises(JobNotFound):
        service.job_document(mine.id, owner="bob")
    assert service.list_jobs(owner="bob").total == 0
    assert service.list_jobs(owner="alice").total == 1


def test_usage_counts_an_owners_jobs_and_stored_bytes(store: JobStore) -> None:
    store.add(job(1, "alice"), PAYLOAD)
    store.add(job(2, "alice"), PAYLOAD)
    store.add(job(3, "bob"), PAYLOAD)
    assert (store.usage("alice").jobs, store.usage("alice").stored_bytes) == (2, 2 * INPUT_BYTES)
    done = finish(store, job(1, "alice"), size=100)
    result = len(json.dumps(done.result, separators=(",", ":")))
    assert store.usage("alice").stored_bytes == INPUT_BYTES + result
    assert store.usage("bob").jobs == 1 and store.usage("carol").jobs == 0


def test_an_owner_over_its_job_quota_drops_its_oldest_finished_jobs(store: JobStore) -> None:
    for n in range(5):
        store.add(job(n), PAYLOAD)
        finish(store, job(n))
    store.add(job(8), PAYLOAD)  # unfinished: never dropped
    store.add(job(9, "bob"), PAYLOAD)
    finish(store, job(9, "bob"))
    assert store.prune_owner("alice", 3, 1 << 30) == 3
    assert listed(store, "alice") == ["job0008", "job0004", "job0003"]
    assert listed(store, "bob") == ["job0009"]
    assert store.prune_owner("alice", 3, 1 << 30) == 0


def test_an_owner_over_its_byte_quota_drops_its_oldest_finished_jobs(store: JobStore) -> None:
    for n in range(4):
        store.add(job(n), PAYLOAD)
        finish(store, job(n), size=1000)
    store.add(job(8), PAYLOAD)
    result = len(json.dumps({"x": "y" * 1000}, separators=(",", ":")))
    assert store.usage("alice").stored_bytes == INPUT_BYTES + 4 * result
    assert store.prune_owner("alice", 100, INPUT_BYTES + 2 * result - 1) == 3
    assert listed(store, "alice") == ["job0008", "job0003"]
    assert store.usage("alice").stored_bytes == INPUT_BYTES + result


def test_unfinished_jobs_alone_are_never_dropped_for_a_quota(store: JobStore) -> None:
    for n in range(3):
        store.add(job(n), PAYLOAD)
    store.add(job(4), PAYLOAD)
    finish(store, job(4))
    assert store.prune_owner("alice", 1, 1) == 1
    assert listed(store, "alice") == ["job0002", "job0001", "job0000"]


def test_a_new_job_makes_room_and_is_refused_only_when_unfinished_jobs_fill_the_quota(
    service: JobManagementService, store: JobStore, payload: dict
) -> None:
    first = service.create_job("image_info", payload, owner="alice")
    for _ in range(2):
        service.create_job("image_info", payload, owner="alice")
    with pytest.raises(QuotaExceeded) as refused:
        service.create_job("image_info", payload, owner="alice")
    assert refused.value.reason == "quota_exceeded"
    assert store.usage("alice").jobs == 3
    service.create_job("image_info", payload, owner="bob")  # another owner's quota
    finish(store, first)
    fourth = service.create_job("image_info", payload, owner="alice")
    assert store.get(first.id) is None and store.get(fourth.id) is not None


# -- retention and size ---------------------------------------------------------


def test_retention_drops_only_finished_jobs_past_it(store: JobStore) -> None:
    long_ago = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    for n in range(3):
        store.add(job(n), PAYLOAD)
    finish(store, job(0), finished_at=long_ago)
    finish(store, job(1))
    assert store.prune(older_than_s=3600) == 1
    assert listed(store) == ["job0002", "job0001"]
    assert store.prune(older_than_s=0) == 1
    assert listed(store) == ["job0002"]  # unfinished: kept, however old


def test_pruning_to_a_size_drops_the_oldest_finished_jobs(store: JobStore) -> None:
    for n in range(12):
        store.add(job(n), PAYLOAD)
        finish(store, job(n), size=20_000)
    store.add(job(20), PAYLOAD)
    full = store.size_bytes()
    target = full - 4 * 20_000
    pruned = store.prune_to_size(target)
    assert 4 <= pruned < 12
    assert store.size_bytes() <= target
    kept = [f"job{n:04d}" for n in reversed(range(pruned, 12))]
    assert listed(store) == ["job0020", *kept]  # the newest stay, the oldest went
    assert store.prune_to_size(store.size_bytes()) == 0


def test_pruning_to_a_size_never_drops_unfinished_jobs(store: JobStore) -> None:
    for n in range(3):
        store.add(job(n), PAYLOAD)
    store.add(job(3), PAYLOAD)
    finish(store, job(3))
    assert store.prune_to_size(0) == 1
    assert listed(store) == ["job0002", "job0001", "job0000"]


# -- start-up -------------------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "sqlite"], indirect=True)
def test_recovery_ends_the_unfinished_jobs_of_a_single_node_store(store: JobStore) -> None:
    # The shared store declares no job dead (tests/cluster/test_pgstore.py).
    for n in range(3):
        store.add(job(n), PAYLOAD)
    store.update(replace(job(1), status=JobStatus.RUNNING, started_at=now_iso()))
    done = finish(store, job(2))
    assert store.recover({"reason": "interrupted"}) == 2
    for n in range(2):
        ended = store.get(f"job{n:04d}")
        assert ended is not None and ended.status is JobStatus.INTERRUPTED
        assert ended.error == {"reason": "interrupted"} and ended.finished_at
        assert store.payload(ended.id) is None
    assert store.get("job0002") == done
    reason = len('{"reason":"interrupted"}')
    assert store.usage("alice").stored_bytes == 2 * reason + len('{"x":"yyyyyyyyyy"}')


# -- idempotency keys -------------------------------------------------------------

KEYED = Idempotency("key-1", "digest-a")


def test_a_key_holds_one_job_of_its_owner_and_a_second_add_stores_nothing(
    store: JobStore,
) -> None:
    assert store.add(job(1), PAYLOAD, KEYED) is None
    held = store.add(job(2), PAYLOAD, Idempotency("key-1", "digest-b"))
    assert held is not None
    assert held[0].id == "job0001" and held[1] == "digest-a"  # the first request's digest
    assert store.get("job0002") is None
    assert store.usage("alice").jobs == 1
    assert store.keyed("alice", "key-1") == held
    assert store.keyed("alice", "key-2") is None


def test_the_same_key_of_another_owner_is_independent(store: JobStore) -> None:
    assert store.add(job(1), PAYLOAD, KEYED) is None
    assert store.add(job(2, owner="bob"), PAYLOAD, KEYED) is None
    bobs = store.keyed("bob", "key-1")
    assert bobs is not None and bobs[0].id == "job0002"


def test_a_keyed_job_is_found_with_its_current_status(store: JobStore) -> None:
    store.add(job(1), PAYLOAD, KEYED)
    done = finish(store, job(1))
    assert store.keyed("alice", "key-1") == (done, "digest-a")


def test_jobs_without_a_key_never_collide(store: JobStore) -> None:
    assert store.add(job(1), PAYLOAD) is None
    assert store.add(job(2), PAYLOAD) is None
    assert store.usage("alice").jobs == 2


def test_a_pruned_job_frees_its_key(store: JobStore) -> None:
    long_ago = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    store.add(job(1), PAYLOAD, KEYED)
    finish(store, job(1), finished_at=long_ago)
    assert store.prune(older_than_s=3600) == 1
    assert store.keyed("alice", "key-1") is None
    assert store.add(job(2), PAYLOAD, Idempotency("key-1", "digest-b")) is None
    assert store.keyed("alice", "key-1") == (job(2), "digest-b")


def test_racing_adds_of_one_key_store_one_job(store: JobStore) -> None:
    start = threading.Barrier(6)

    def add(n: int) -> tuple[Job, str] | None:
        start.wait(timeout=10)
        return store.add(job(n), PAYLOAD, KEYED)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(add, range(6)))
    stored = [n for n, answer in enumerate(answers) if answer is None]
    assert len(stored) == 1
    winner = f"job{stored[0]:04d}"
    assert all(answer is None or answer[0].id == winner for answer in answers)
    assert store.usage("alice").jobs == 1
