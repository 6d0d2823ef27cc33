"""What an operator sees of a multi-node deployment: the queue, the oldest
waiting job, the live workers and their plugins in /metrics, /readyz and
/v1/plugins, and `plughost nodes`."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request

from fastapi.testclient import TestClient

from host.api.app import create_app
from host.config import Settings
from host.services.build import Services, build_services
from host.services.store import MemoryJobStore
from tests.cluster.conftest import CLUSTER, FAST, ROOT, live_workers
from tests.cluster.pg import free_port, wait_for
from tests.conftest import make_png

PAYLOAD = {"image": make_png(8, 8), "mime_type": "image/png", "options": {"s": 0.5}}
pytestmark = CLUSTER


def gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_show_the_queue_and_the_live_workers(api, workers, plugins_dir):
    services: Services = api()
    app = create_app(Settings(self_check=False, admin_token="admin-token"), services)
    with TestClient(app) as client:
        first = client.get("/metrics").text
        assert gauge(first, "plughost_cluster_workers_live") == 0
        workers.start("--workers", "1")
        wait_for(lambda: live_workers(services), 30, "a live worker")
        futures = [services.analysis.submit("nap", PAYLOAD)[1] for _ in range(4)]
        services.jobs.runner._counts = (-1.0, {})  # read the database now, not the cached figures
        text = client.get("/metrics").text
        assert gauge(text, "plughost_cluster_workers_live") == 1
        assert gauge(text, "plughost_cluster_worker_slots") == 1
        assert gauge(text, "plughost_cluster_queue_depth") >= 2
        assert gauge(text, "plughost_cluster_oldest_waiting_seconds") >= 0
        plugins = client.get("/v1/plugins").json()["plugins"]
        nap = next(p for p in plugins if p["name"] == "nap")
        assert len(nap["nodes"]) == 1 and nap["hash"]
        for future in futures:
            future.result(timeout=30)
        ready = client.get("/readyz").json()
        assert ready["ready"]
        worker = next(n for n in services.nodes() if n["role"] == "worker")
        assert worker["state"] == "healthy" and worker["last_seen"]
        admin = {"Authorization": "Bearer admin-token"}  # the nodes are the admin's to see
        console = client.get("/console", headers=admin).text
        assert "Nodes" in console and worker["name"] in console
        assert worker["name"] not in client.get("/console").text


def test_plughost_nodes_lists_each_node_with_its_health_and_plugins(api, workers, db_url):
    services = api()
    workers.start("--workers", "1")
    wait_for(lambda: live_workers(services), 30, "a live worker")
    listed = subprocess.run(
        [sys.executable, "-m", "host.cli", "nodes", "--database-url", db_url, "--json"],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), **FAST},
        check=True,
    )
    nodes = json.loads(listed.stdout)["nodes"]
    worker = next(n for n in nodes if n["role"] == "worker")
    assert worker["healthy"]
    assert worker["concurrency"] == 1
    assert {"echo", "nap", "dies", "image_info"} <= set(worker["plugins"])
    assert worker["plugins"]["echo"]["version"] == "0.1.0"
    assert worker["plugins"]["echo"]["hash"] == services.plugins.inventory["echo"]["hash"]
    table = subprocess.run(
        [sys.executable, "-m", "host.cli", "nodes", "--database-url", db_url],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)},
        check=True,
        text=True,
    )
    assert worker["name"] in table.stdout and "healthy" in table.stdout


def test_a_single_node_has_no_nodes_and_keeps_its_metrics(tmp_path):
    services = build_services(Settings(prewarm=0), store=MemoryJobStore())
    try:
        assert services.nodes() == []
        text = create_app(Settings(self_check=False), services)
        with TestClient(text) as client:
            body = client.get("/metrics").text
        assert "plughost_queue_depth" in body
        assert "plughost_cluster_" not in body
    finally:
        services.jobs.shutdown()
        services.plugins.close()


def test_a_job_for_a_plugin_no_worker_has_gets_503(api):
    services = api()
    app = create_app(Settings(self_check=False, admin_token="admin-token"), services)
    body = {
        "plugin": "echo",
        "image": base64.b64encode(PAYLOAD["image"]).decode(),
        "mime_type": "image/png",
    }
    with TestClient(app) as client:
        answer = client.post("/v1/jobs", json=body)
    assert answer.status_code == 503
    assert answer.json()["detail"]["details"]["reason"] == "no_worker"
    assert answer.headers["Retry-After"] == "5"


def test_a_worker_node_serves_its_own_metrics(api, workers):
    services = api()
    port = free_port()
    workers.start("--workers", "1", "--metrics-port", str(port))
    wait_for(lambda: live_workers(services), 30, "a live worker")
    services.analysis.submit("echo", PAYLOAD)[1].result(timeout=30)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return str(answer.read().decode())

    text = scrape()
    assert gauge(text, "plughost_worker_slots") == 1
    assert 'plughost_plugin_calls_total{plugin="echo",outcome="success"} 1' in text
