"""The job store every contract test here runs on: memory, SQLite, PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from host.services.jobrows import JobStore
from host.services.store import MemoryJobStore, SQLiteJobStore
from tests.cluster.pg import NEEDS_POSTGRES


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=NEEDS_POSTGRES)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "memory":
        yield MemoryJobStore()
        return
    if request.param == "sqlite":
        sqlite = SQLiteJobStore(tmp_path / "jobs.sqlite3")
        yield sqlite
        sqlite.close()
        return
    from host.cluster.pgstore import PgJobStore, open_pool
    from host.cluster.schema import ensure_schema

    url = request.getfixturevalue("db_url")
    ensure_schema(url)
    pool = open_pool(url, max_size=8)  # the batch store's tests end one batch from 8 threads
    yield PgJobStore(pool)
    pool.close()
