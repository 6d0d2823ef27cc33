"""The shared job store keeps the records and bounds of the SQLite store:
the same jobs, documents, pages, usage and pruning, in PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

import pytest

from host.cluster.schema import ensure_schema
from host.services.pgstore import DatabaseUnavailable, PgJobStore, open_pool
from host.services.store import Job, JobStatus, now_iso
from tests.cluster.conftest import CLUSTER
from tests.cluster.pg import free_port
from tests.conftest import make_png

pytestmark = CLUSTER
PAYLOAD = {"image": make_png(8, 8), "mime_type": "image/png", "options": {"k": 1}}


@pytest.fixture
def store(db_url: str) -> Iterator[PgJobStore]:
    ensure_schema(db_url)
    pool = open_pool(db_url, max_size=2)
    yield PgJobStore(pool)
    pool.close()


def job(n: int, owner: str = "a", plugin: str = "echo") -> Job:
    return Job(
        id=f"job{n:04d}",
        plugin=plugin,
        status=JobStatus.PENDING,
        created_at=f"2026-01-01T00:00:{n:02d}+00:00",
        owner=owner,
    )


def finish(store: PgJobStore, pending: Job, size: int = 10) -> Job:
    done = replace(
        pending, status=JobStatus.SUCCESS, finished_at=now_iso(), result={"x": "y" * size}
    )
    store.update(done)
    return done


def test_a_job_and_its_input_round_trip_and_the_input_goes_when_it_ends(store):
    store.add(job(1), PAYLOAD)
    assert store.get("job0001") == job(1)
    assert store.payload("job0001") == PAYLOAD
    finish(store, job(1))
    assert store.payload("job0001") is None
    owner, document = store.document("job0001")  # type: ignore[misc]
    assert owner == "a"
    assert json.loads(document)["result"] == {"x": "y" * 10}
    assert store.get("missing") is None and store.document("missing") is None


def test_pages_filter_count_and_stop_at_the_byte_cap(store):
    for n in range(6):
        store.add(job(n, owner="a" if n % 2 else "b"), PAYLOAD)
    page = store.page("a", None, None, limit=10, offset=0, max_bytes=1 << 20)
    assert page.total == 3
    assert [json.loads(d)["id"] for d in page.documents] == ["job0005", "job0003", "job0001"]
    capped = store.page(None, JobStatus.PENDING, "echo", limit=10, offset=0, max_bytes=300)
    assert capped.truncated and len(capped.documents) == 1 and capped.next_offset == 1


def test_usage_and_per_owner_pruning_keep_the_newest_jobs(store):
    for n in range(5):
        store.add(job(n), PAYLOAD)
        finish(store, job(n))
    store.add(job(9), PAYLOAD)  # unfinished: never pruned
    assert store.usage("a").jobs == 6
    assert store.prune_owner("a", max_jobs=3, max_bytes=1 << 30) == 3
    left = store.page("a", None, None, 10, 0, 1 << 20).documents
    assert [json.loads(d)["id"] for d in left] == ["job0009", "job0004", "job0003"]


def test_pruning_by_age_and_by_size_drops_only_finished_jobs(store):
    for n in range(4):
        store.add(job(n), PAYLOAD)
        finish(store, job(n), size=1000)
    store.add(job(8), PAYLOAD)
    assert store.prune(older_than_s=3600) == 0
    assert store.prune_to_size(2500) == 2  # the two oldest finished ones
    assert store.get("job0000") is None and store.get("job0002") is not None
    assert store.prune(older_than_s=0) == 2
    assert store.get("job0008") is not None


def test_an_unreachable_database_is_a_clear_error():
    pool = open_pool(f"postgresql://nobody@127.0.0.1:{free_port()}/none", timeout_s=1)
    try:
        with pytest.raises(DatabaseUnavailable) as failed:
            PgJobStore(pool).get("x")
        assert failed.value.reason == "database_unavailable"
        assert failed.value.envelope["error"]["details"]["retry_after_s"] > 0
    finally:
        pool.close()
