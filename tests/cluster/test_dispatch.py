"""Jobs across nodes: recorded and queued in one transaction, run on a worker
node of the plugin version they were accepted for, their result written
exactly once, retried after their node dies, cancelled on their node."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import psycopg
import pytest

from host.cluster.dispatch import TASK_NAME, NoWorker
from host.config import ConfigError, load_settings
from host.services.store import JobStatus
from tests.cluster.conftest import CLUSTER, ROOT, live_workers
from tests.cluster.pg import ensure_user, wait_for
from tests.conftest import make_png, write_plugin

PAYLOAD = {"image": make_png(), "mime_type": "image/png", "options": {}}
pytestmark = CLUSTER


def nap(seconds: float) -> dict[str, object]:
    return {**PAYLOAD, "options": {"s": seconds}}


def row(url: str, job_id: str) -> dict[str, object]:
    with psycopg.connect(url) as conn:
        cursor = conn.execute(
            "SELECT status, attempts, completions, node, error FROM plughost_jobs WHERE id = %s",
            (job_id,),
        )
        found = cursor.fetchone()
    assert found is not None
    return dict(zip(("status", "attempts", "completions", "node", "error"), found, strict=True))


def test_job_runs_on_a_worker_node_and_its_result_is_written_once(api, workers, db_url):
    services = api()
    with pytest.raises(NoWorker) as refused:
        services.analysis.submit("echo", PAYLOAD)
    assert refused.value.reason == "no_worker"
    assert services.jobs.list_jobs().total == 0  # refused: nothing stored
    workers.start()
    wait_for(lambda: live_workers(services), 30, "a live worker")
    job, future = services.analysis.submit("echo", PAYLOAD)
    done = future.result(timeout=30)
    assert done.status is JobStatus.SUCCESS
    assert done.result == {"size": len(PAYLOAD["image"])}
    assert row(db_url, job.id)["completions"] == 1
    assert row(db_url, job.id)["attempts"] == 1
    described = services.plugins.describe("echo")
    assert described["metrics"]["success_count"] == 1  # counted by the worker, seen here
    assert described["nodes"] and described["hash"]


def test_a_failed_dispatch_stores_no_job(api, workers, db_url):
    services = api()
    workers.start()
    wait_for(lambda: live_workers(services), 30, "a live worker")

    def broken(conn, job, priority):  # type: ignore[no-untyped-def]
        raise RuntimeError("queue refused")

    services.jobs.runner.pg.dispatch = broken
    with pytest.raises(RuntimeError):
        services.analysis.submit("echo", PAYLOAD)
    assert services.jobs.list_jobs().total == 0


def test_a_redelivered_finished_job_is_not_run_again(api, workers, db_url):
    services = api()
    workers.start()
    wait_for(lambda: live_workers(services), 30, "a live worker")
    job, future = services.analysis.submit("echo", PAYLOAD)
    assert future.result(timeout=30).status is JobStatus.SUCCESS
    # Deliver the same job again, as a broker redelivery would.
    queue = services.plugins.inventory["echo"]["queue"]
    with psycopg.connect(db_url) as conn:
        task = services.jobs.runner.app.tasks[TASK_NAME]
        task.configure(queue=queue, connection=conn).defer(job_id=job.id)
    wait_for(lambda: _queue_empty(db_url), 30, "the redelivery to be consumed")
    assert row(db_url, job.id)["completions"] == 1
    assert services.jobs.get_job(job.id).status is JobStatus.SUCCESS


def _queue_empty(url: str) -> bool:
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT COUNT(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        ).fetchone()
    return found is not None and found[0] == 0


def test_a_killed_workers_job_is_retried_on_another_node(api, workers, db_url):
    services = api()
    first = workers.start()
    wait_for(lambda: live_workers(services), 30, "a live worker")
    job, future = services.analysis.submit("nap", nap(2.0))
    wait_for(lambda: row(db_url, job.id)["status"] == "RUNNING", 30, "the job to start")
    dead = row(db_url, job.id)["node"]
    workers.kill(first)
    workers.start()
    done = future.result(timeout=60)
    assert done.status is JobStatus.SUCCESS
    record = row(db_url, job.id)
    assert record["attempts"] == 2
    assert record["completions"] == 1
    assert record["node"] != dead
    # The dead node leaves the node list once it has been silent three times stalled_after_s.
    wait_for(lambda: dead not in {n["name"] for n in services.nodes()}, 30, "the node pruned")


def test_a_job_ends_interrupted_after_max_attempts(api, workers, db_url):
    services = api()
    first = workers.start(env={"PLUGHOST_MAX_ATTEMPTS": "1"})
    wait_for(lambda: live_workers(services), 30, "a live worker")
    job, future = services.analysis.submit("nap", nap(30.0))
    wait_for(lambda: row(db_url, job.id)["status"] == "RUNNING", 30, "the job to start")
    workers.kill(first)
    workers.start(env={"PLUGHOST_MAX_ATTEMPTS": "1"})
    done = future.result(timeout=60)
    assert done.status is JobStatus.INTERRUPTED
    assert done.error is not None
    assert done.error["details"]["reason"] == "interrupted"
    assert done.error["details"]["attempts"] == 1
    assert row(db_url, job.id)["completions"] == 0


def test_cancel_reaches_the_node_running_the_job(api, workers, db_url):
    services = api()
    workers.start()
    wait_for(lambda: live_workers(services), 30, "a live worker")
    job, future = services.analysis.submit("nap", nap(30.0))
    wait_for(lambda: row(db_url, job.id)["status"] == "RUNNING", 30, "the job to start")
    started = time.monotonic()
    cancelled = services.jobs.cancel_job(job.id, wait_s=15)
    assert cancelled.status is JobStatus.CANCELLED
    assert time.monotonic() - started < 15
    assert future.result(timeout=10).status is JobStatus.CANCELLED


def test_three_unavailable_outcomes_on_three_nodes_quarantine_the_plugin(api, workers, db_url):
    services = api(quarantine_threshold=3)
    nodes = set()
    for _ in range(3):
        node = workers.start()
        wait_for(lambda: live_workers(services), 30, "a live worker")
        job, future = services.analysis.submit("dies", PAYLOAD)
        done = future.result(timeout=30)
        assert done.error is not None and done.error["details"]["reason"] == "crashed"
        nodes.add(row(db_url, job.id)["node"])
        workers.kill(node)
        wait_for(lambda: not live_workers(services), 30, "the node to be silent")
    assert len(nodes) == 3
    assert services.plugins.quarantine.retry_after("dies") is not None
    status = services.plugins.describe("dies")
    assert status["quarantine"]["quarantined"]
    assert status["state"] == "UNAVAILABLE"


def test_a_job_is_refused_when_no_live_node_has_the_same_plugin_content(api, workers, tmp_path):
    other = tmp_path / "other"
    write_plugin(other, "echo", 'return {"size": 0}')  # same name and version, other code
    services = api(plugins_dirs=[str(other)])
    workers.start()
    wait_for(lambda: live_workers(services), 30, "a live worker")
    with pytest.raises(NoWorker) as refused:
        services.analysis.submit("echo", PAYLOAD)
    assert (
        refused.value.envelope["error"]["details"]["hash"]
        == (services.plugins.inventory["echo"]["hash"])
    )
    assert services.plugins.describe("echo")["nodes"] == []


def test_a_database_url_must_be_postgresql():
    with pytest.raises(ConfigError, match="database_url"):
        load_settings(overrides={"database_url": "mysql://db/plughost"})


@pytest.mark.parametrize("command", ["worker", "nodes"])
def test_the_multi_node_commands_need_a_database_url(command):
    refused = subprocess.run(
        [sys.executable, "-m", "host.cli", command],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)},
        text=True,
    )
    assert refused.returncode == 2
    assert "--database-url" in refused.stderr


def test_a_worker_node_gives_up_root_and_still_runs_jobs(api, workers, db_url):
    user = "plughost-node"
    uid = ensure_user(user)
    services = api()
    node = workers.start("--user", user)
    wait_for(lambda: live_workers(services), 30, "a live worker")
    done = services.analysis.submit("echo", PAYLOAD)[1].result(timeout=30)
    assert done.status is JobStatus.SUCCESS
    assert psutil.Process(node.pid).uids().real == uid


def test_a_worker_node_refuses_an_unknown_user(workers):
    node = workers.start("--user", "no-such-user-here")
    assert node.wait(timeout=60) == 1
