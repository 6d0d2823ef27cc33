"""Faults, with nothing lost: worker nodes killed at random under load, the
database stopped and started mid-run, an API node killed mid-stream."""

from __future__ import annotations

import base64
import http.client
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from host.api.app import create_app
from host.cluster.pgstore import DatabaseUnavailable
from host.config import Settings
from host.services.store import FINISHED, JobStatus
from tests.cluster.conftest import CLUSTER, FAST, ROOT, Workers, live_workers
from tests.cluster.pg import PgCluster, free_port, wait_for
from tests.conftest import make_png
from tests.host.test_serve import request

PAYLOAD = {"image": make_png(8, 8), "mime_type": "image/png", "options": {}}
pytestmark = CLUSTER


def outcomes(url: str) -> dict[str, int]:
    """How many jobs are in each status, and how many ran to completion twice."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT status, COUNT(*) FROM plughost_jobs GROUP BY status").fetchall()
        twice = conn.execute("SELECT COUNT(*) FROM plughost_jobs WHERE completions > 1").fetchone()
    found = {status: count for status, count in rows}
    found["completed_twice"] = twice[0] if twice else 0
    return found


@pytest.mark.timeout(180)
def test_a_thousand_jobs_survive_workers_killed_at_random(api, workers, db_url):
    services = api()
    env = {"PLUGHOST_MAX_ATTEMPTS": "50"}
    nodes = [workers.start("--workers", "2", env=env) for _ in range(3)]
    wait_for(lambda: live_workers(services) == 3, 60, "three live workers")
    # Each job naps 80 ms, so 1000 of them on six worker slots outlast the
    # eight kills however fast a sandboxed call gets.
    nap = {**PAYLOAD, "options": {"s": 0.08}}
    futures = [services.analysis.submit("nap", nap)[1] for _ in range(1000)]
    rng = random.Random(14)
    for _ in range(8):
        time.sleep(rng.uniform(0.3, 0.8))
        assert not all(f.done() for f in futures), "every job finished before the eighth kill"
        victim = rng.randrange(len(nodes))
        workers.kill(nodes[victim])
        nodes[victim] = workers.start("--workers", "2", env=env)
    deadline = time.monotonic() + 150
    while not all(f.done() for f in futures):
        assert time.monotonic() < deadline, f"jobs left: {outcomes(db_url)}"
        time.sleep(0.2)
    done = [f.result(timeout=1) for f in futures]
    failed = [job.error for job in done if job.status is not JobStatus.SUCCESS]
    assert not failed, (outcomes(db_url), failed[:3])
    found = outcomes(db_url)
    assert found == {"SUCCESS": 1000, "completed_twice": 0}
    with psycopg.connect(db_url) as conn:
        retried = conn.execute("SELECT COUNT(*) FROM plughost_jobs WHERE attempts > 1").fetchone()
    assert retried is not None and retried[0] > 0  # the kills hit running jobs


def _node_of(url: str, pid: int) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT name FROM plughost_nodes WHERE pid = %s", (pid,)).fetchone()
    return str(row[0]) if row else ""


@pytest.mark.timeout(120)
def test_a_killed_workers_job_runs_again_on_the_other_worker(api, workers, db_url):
    services = api()
    first, second = workers.start("--workers", "1"), workers.start("--workers", "1")
    wait_for(lambda: live_workers(services) == 2, 60, "two live workers")
    names = {
        p.pid: wait_for(lambda p=p: _node_of(db_url, p.pid), 30, "a node row")
        for p in (first, second)
    }
    job, future = services.analysis.submit("nap", {**PAYLOAD, "options": {"s": 2}})
    holder = wait_for(
        lambda: (
            (found := services.jobs.get_job(job.id)).status is JobStatus.RUNNING
            and found.started_at
            and _holder(db_url, job.id)
        ),
        60,
        "the job to run",
    )
    victim = first if names[first.pid] == holder else second
    survivor = second if victim is first else first
    workers.kill(victim)
    done = future.result(timeout=60)
    assert done.status is JobStatus.SUCCESS
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT attempts, node, completions FROM plughost_jobs WHERE id = %s", (job.id,)
        ).fetchone()
    assert row == (2, names[survivor.pid], 1)


def _holder(url: str, job_id: str) -> str | None:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT node FROM plughost_jobs WHERE id = %s", (job_id,)).fetchone()
    return None if row is None else row[0]


@pytest.mark.timeout(180)
def test_a_worker_runs_as_many_jobs_at_once_as_it_has_slots(api, workers, db_url):
    # More slots than the threads of asyncio's default executor (CPUs + 4),
    # which would otherwise hold the rest of the node's jobs unstarted.
    slots = (os.cpu_count() or 1) + 6
    services = api()
    workers.start("--workers", str(slots))
    wait_for(lambda: live_workers(services), 60, "a live worker")
    nap = {**PAYLOAD, "options": {"s": 60}}
    submitted = [services.analysis.submit("nap", nap)[0] for _ in range(slots)]
    wait_for(
        lambda: outcomes(db_url).get("RUNNING", 0) == slots, 120, f"{slots} jobs running at once"
    )
    for job in submitted:
        services.jobs.cancel_job(job.id, wait_s=0)


@pytest.fixture
def own_pg() -> Iterator[PgCluster]:
    """A server of this test's own, to stop and start."""
    cluster = PgCluster()
    yield cluster
    cluster.close()


@pytest.mark.timeout(180)
def test_every_accepted_job_finishes_across_a_database_restart(own_pg, plugins_dir, tmp_path):
    url = own_pg.database("restart")
    settings = Settings(
        database_url=url,
        plugins_dirs=[str(plugins_dir)],
        heartbeat_s=0.5,
        stalled_after_s=3.0,
        prewarm=0,
        self_check=False,
    )
    workers = Workers(url, plugins_dir, tmp_path)
    app = create_app(settings)
    try:
        workers.start("--workers", "2")
        with TestClient(app) as client:
            services = app.state.services
            wait_for(lambda: live_workers(services), 60, "a live worker")
            futures = [
                services.analysis.submit("nap", {**PAYLOAD, "options": {"s": 0.02}})[1]
                for _ in range(150)
            ]
            wait_for(lambda: sum(f.done() for f in futures) >= 20, 60, "some jobs done")
            own_pg.stop("fast")
            assert not all(f.done() for f in futures), "every job finished before the stop"
            with pytest.raises(DatabaseUnavailable):
                services.analysis.submit("echo", PAYLOAD)
            answer = client.post("/v1/jobs", json=_body())
            assert answer.status_code == 503
            assert answer.json()["detail"]["details"]["reason"] == "database_unavailable"
            assert int(answer.headers["Retry-After"]) >= 1
            time.sleep(2)
            own_pg.start()
            # The API recovers by itself.
            accepted = wait_for(
                lambda: _accepted(client.post("/v1/jobs", json=_body())),
                60,
                "the API to accept jobs again",
                every_s=0.5,
            )
            for future in futures:
                assert future.result(timeout=90).status is JobStatus.SUCCESS
            # The job accepted after the restart is counted once it ended
            # (on a loaded machine it can still be running here).
            ended = wait_for(
                lambda: _ended(client.get(accepted)),
                90,
                "the job accepted after the restart to end",
                every_s=0.2,
            )
            assert ended == "SUCCESS"
        found = outcomes(url)
        assert found["completed_twice"] == 0
        assert found.get("SUCCESS", 0) >= 151
    finally:
        workers.stop_all()


def _accepted(answer: Any) -> str | None:
    """The job's address when the API accepted it (202), else None."""
    return str(answer.headers["Location"]) if answer.status_code == 202 else None


def _ended(answer: Any) -> str | None:
    """The job's final status, None while it is queued or running."""
    status = str(answer.json()["status"]) if answer.status_code == 200 else ""
    return status if status in FINISHED else None


def _body() -> dict[str, object]:
    return {
        "plugin": "echo",
        "image": base64.b64encode(PAYLOAD["image"]).decode(),
        "mime_type": "image/png",
    }


def _post(port: int) -> tuple[int, dict[str, object]]:
    return request(port, "POST", "/v1/jobs", _body(), timeout_s=10)


@pytest.mark.timeout(180)
def test_killing_an_api_node_loses_no_accepted_job(api, workers, db_url, plugins_dir, tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "host.cli",
            "serve",
            "--database-url",
            db_url,
            "--plugins-dir",
            str(plugins_dir),
            "--port",
            str(port),
            "--prewarm",
            "0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={
            **os.environ,
            **FAST,
            "PYTHONPATH": str(ROOT),
            "PLUGHOST_SELF_CHECK": "false",
        },
    )
    try:
        workers.start()
        services = api()
        wait_for(lambda: live_workers(services), 60, "a live worker")
        wait_for(lambda: _ready(port), 60, "the API node")
        accepted: list[str] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    status, body = _post(port)
                except (OSError, http.client.HTTPException):
                    return  # the node died mid-request: that job was never acknowledged
                if status == 202:
                    accepted.append(body["job"]["id"])  # type: ignore[index]

        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        wait_for(lambda: len(accepted) >= 100, 60, "100 accepted jobs")
        server.send_signal(signal.SIGKILL)  # while the clients are still sending
        server.wait(timeout=30)
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
        assert len(accepted) >= 100
        # Another API node sees every accepted job finish.
        for job_id in accepted:
            wait_for(
                lambda job_id=job_id: services.jobs.get_job(job_id).status is JobStatus.SUCCESS,
                60,
                f"job {job_id}",
            )
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=30)
        log.close()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False
