"""Idempotency keys on an API node of a multi-node deployment: the unique
(owner, key) index of PostgreSQL's jobs table holds one job per key, also
when retries race on separate connections, and a retry queues nothing."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg
from fastapi.testclient import TestClient

from host.api.app import create_app
from host.config import Settings
from host.services.build import Services
from tests.cluster.conftest import CLUSTER, live_workers
from tests.cluster.pg import wait_for
from tests.conftest import make_png, write_plugin

pytestmark = CLUSTER
BODY = {
    "plugin": "echo",
    "image": base64.b64encode(make_png()).decode(),
    "mime_type": "image/png",
    "options": {},
}


def stored(url: str) -> tuple[int, int]:
    """`(jobs in plughost_jobs, queue entries they were dispatched as)`."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT queue_job_id) FROM plughost_jobs"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_a_retried_submission_to_an_api_node_is_one_job(api, workers, db_url):
    services: Services = api()
    workers.start()
    wait_for(lambda: live_workers(services), 30, "a live worker")
    app = create_app(Settings(self_check=False), services)
    with TestClient(app) as client:
        key = {"Idempotency-Key": "order-42"}
        answers = [client.post("/v1/jobs", json=BODY, headers=key) for _ in range(3)]
        assert [a.status_code for a in answers] == [202] * 3
        assert len({a.json()["job"]["id"] for a in answers}) == 1
        analyzed = client.post("/v1/analyze", json=BODY, headers=key)
        assert analyzed.status_code in (200, 202)
        assert stored(db_url) == (1, 1)

        start = threading.Barrier(6)

        def send(_: int) -> str:
            start.wait(timeout=10)
            answer = client.post("/v1/analyze", json=BODY, headers={"Idempotency-Key": "race"})
            assert answer.status_code in (200, 202), answer.text
            data = answer.json()
            return str(data["job"]["id"] if "job" in data else data["job_id"])

        with ThreadPoolExecutor(6) as pool:
            assert len(set(pool.map(send, range(6)))) == 1
        assert stored(db_url) == (2, 2)

        other = {**BODY, "options": {"x": 1}}
        refused = client.post("/v1/jobs", json=other, headers=key)
        assert refused.status_code == 409
        assert refused.json()["detail"]["details"]["reason"] == "idempotency_key_reused"
        assert stored(db_url) == (2, 2)


def test_a_retried_analyze_waits_for_the_job_running_on_a_worker(api, workers, db_url, plugins_dir):
    write_plugin(plugins_dir, "once", "time.sleep(1)\nreturn {'run': os.urandom(8).hex()}")
    services: Services = api()
    workers.start()
    wait_for(lambda: live_workers(services), 30, "a live worker")
    app = create_app(Settings(self_check=False), services)
    body = {**BODY, "plugin": "once"}
    key = {"Idempotency-Key": "once-1"}
    with TestClient(app) as client, ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/v1/analyze", json=body, headers=key)
        wait_for(lambda: _running(db_url), 60, "the job to run on the worker")
        retried = client.post("/v1/analyze", json=body, headers=key)
        created = first.result(timeout=60)
    assert (created.status_code, retried.status_code) == (200, 200), retried.text
    assert retried.json() == created.json()  # the one run's result, twice
    with psycopg.connect(db_url) as conn:
        runs = conn.execute("SELECT attempts, completions FROM plughost_jobs").fetchall()
    assert runs == [(1, 1)]


def _running(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT status FROM plughost_jobs").fetchone()
    return row is not None and row[0] == "RUNNING"
