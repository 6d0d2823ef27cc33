"""An API node whose PostgreSQL is held back stalls no other client: while
a request waits on the database (its jobs table locked by another session,
as a slow or stuck database would keep it), `/healthz` and a request that
needs no database are answered in their usual time, over real HTTP to a
uvicorn server on loopback. A route that waited on the database on the event
loop would hold every other answer until the lock was let go."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx2 as httpx
import psycopg
import pytest

from host.api.app import create_app
from host.config import Settings
from host.services.build import Services
from tests.cluster.conftest import CLUSTER, Workers, live_workers
from tests.cluster.pg import wait_for
from tests.conftest import make_png
from tests.served import served, timed

pytestmark = [*CLUSTER, pytest.mark.timeout(300)]
HOLD_S = 20.0  # the longest the jobs table stays locked, whatever happens
ANSWERED_S = 5.0  # far under HOLD_S: a stalled loop could not answer in it
REACHED_S = 10.0  # how long a request may take to reach the locked table
BODY = {
    "plugin": "echo",
    "image": base64.b64encode(make_png(8, 8)).decode(),
    "mime_type": "image/png",
}
NO_DATABASE = ("/healthz", "/openapi.json")
Request = Callable[[httpx.Client, str], httpx.Response]
# Each route that reads or writes the jobs table (given a finished job's id)
# and the status it answers once the table is let go.
REQUESTS: dict[str, tuple[Request, int]] = {
    "analyze": (lambda c, _: c.post("/v1/analyze", json=BODY), 200),
    "submit a job": (lambda c, _: c.post("/v1/jobs", json=BODY), 202),
    "list jobs": (lambda c, _: c.get("/v1/jobs"), 200),
    "get a job": (lambda c, job: c.get(f"/v1/jobs/{job}"), 200),
    "cancel a finished job": (lambda c, job: c.delete(f"/v1/jobs/{job}"), 409),
}


@contextmanager
def jobs_table_locked(db_url: str) -> Iterator[None]:
    """The jobs table locked against every reader and writer until the
    block ends, and at most HOLD_S: the locking session is then closed
    (by the block's end, or by the server as idle in its transaction)."""
    conn = psycopg.connect(db_url, connect_timeout=5)
    try:
        conn.execute("SET lock_timeout = '10s'")
        conn.execute(f"SET idle_in_transaction_session_timeout = '{int(HOLD_S)}s'")
        conn.execute("LOCK TABLE plughost_jobs IN ACCESS EXCLUSIVE MODE")
        yield
    finally:
        conn.close()  # its transaction, and the lock, end with the session


def waiting_on_a_lock(db_url: str) -> int:
    """Sessions of this database waiting for a lock."""
    with psycopg.connect(db_url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def held_request(base: str, db_url: str, route: str, job: str) -> dict[str, Any]:
    """`route` sent while the jobs table is locked: what the no-database
    requests took meanwhile, whether it waited, and its answer."""
    request, _ = REQUESTS[route]
    answers: list[httpx.Response] = []
    with (
        httpx.Client(base_url=base, timeout=HOLD_S + 30) as held,
        httpx.Client(base_url=base, timeout=HOLD_S + 30) as other,
    ):
        usual = {path: timed(other, path) for path in NO_DATABASE}
        waiter = threading.Thread(target=lambda: answers.append(request(held, job)))
        try:
            with jobs_table_locked(db_url):
                waiter.start()
                wait_for(lambda: waiting_on_a_lock(db_url), REACHED_S, f"{route} to reach the lock")
                took = {path: timed(other, path) for path in NO_DATABASE}
                waited = waiter.is_alive()
        finally:
            if waiter.ident is not None:  # the lock is let go: the request ends
                waiter.join(HOLD_S + 30)
    return {"usual": usual, "took": took, "waited": waited, "answers": answers}


def test_a_held_database_stalls_neither_healthz_nor_other_clients(
    api: Callable[..., Services], workers: Workers, db_url: str
) -> None:
    services = api()
    workers.start("--workers", "1")
    wait_for(lambda: live_workers(services), 60, "a live worker")
    app = create_app(Settings(self_check=False), services)
    with served(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        answer = client.post("/v1/analyze", json=BODY)
        assert answer.status_code == 200, answer.text[:300]
        job = answer.json()["job_id"]
        for route, (_, status) in REQUESTS.items():
            seen = held_request(base, db_url, route, job)
            assert all(t < ANSWERED_S for t in seen["took"].values()), (route, seen)
            assert seen["waited"], f"{route} did not wait for the database"
            assert seen["answers"], f"{route} got no answer"
            got = seen["answers"][0]
            assert got.status_code == status, (route, got.status_code, got.text[:300])
