"""Completion callbacks in a multi-node deployment: jobs that end on worker
nodes are each delivered once with success to a receiver in a network
namespace of its own, by the worker nodes' deliverers (claiming with SKIP
LOCKED), signed with the secret an API node's route gives."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from host.api.app import create_app
from host.config import Settings
from host.services.callbacks import verify
from tests.cluster.conftest import CLUSTER, ROOT, live_workers
from tests.cluster.pg import wait_for
from tests.cluster.test_netns import IP, Link
from tests.conftest import make_png

pytestmark = [
    *CLUSTER,
    pytest.mark.skipif(not os.path.exists(IP), reason="needs iproute2 (make test installs it)"),
]
JOBS = 8
PORT = 18080
BODY = {"image": base64.b64encode(make_png(8, 8)).decode(), "mime_type": "image/png"}


@pytest.fixture
def receiver_link() -> Iterator[Link]:
    """A receiver (tests/callback_receiver.py) alone in a network namespace."""
    link = Link(240 + os.getpid() % 6 * 2, f"cb{os.getpid() % 1000}")
    proc = subprocess.Popen(
        [IP, "netns", "exec", link.ns, sys.executable, "-m", "tests.callback_receiver"]
        + [link.node_ip, str(PORT)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        wait_for(lambda: _log(link) is not None, 30, "the receiver in its namespace")
        yield link
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        link.close()


def _log(link: Link) -> list[dict] | None:
    try:
        with urllib.request.urlopen(f"http://{link.node_ip}:{PORT}/_log", timeout=2) as answer:
            records: list[dict] = json.loads(answer.read())
            return records
    except OSError:
        return None


def test_jobs_ending_on_worker_nodes_each_deliver_one_signed_callback(
    api, workers, receiver_link: Link
):
    allow = {
        "callback_allow": [receiver_link.node_ip],
        "callback_allow_networks": ["10.231.0.0/16"],
        "callback_backoff_s": 0.2,
    }
    services = api(**allow)
    # The API node only accepts jobs and callbacks here: the worker nodes deliver.
    assert services.jobs.callbacks is not None
    services.jobs.callbacks.stop()
    env = {
        "PLUGHOST_CALLBACK_ALLOW": receiver_link.node_ip,
        "PLUGHOST_CALLBACK_ALLOW_NETWORKS": "10.231.0.0/16",
        "PLUGHOST_CALLBACK_BACKOFF_S": "0.2",
    }
    workers.start("--workers", "2", env=env)
    workers.start("--workers", "2", env=env)
    wait_for(lambda: live_workers(services) == 2, 60, "two live workers")
    app = create_app(Settings(self_check=False, **allow), services)
    url = f"http://{receiver_link.node_ip}:{PORT}/flaky/1"  # 500 first, then 200
    with TestClient(app) as client:
        secret = client.get("/v1/callbacks/secret").json()["secret"]
        ids = []
        for _ in range(JOBS):
            answer = client.post("/v1/jobs", json={**BODY, "plugin": "echo", "callback_url": url})
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["job"]["id"])

        def delivered() -> bool:
            views = [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
            return all(v.get("callback", {}).get("state") == "DELIVERED" for v in views)

        wait_for(delivered, 90, "every callback delivered", every_s=0.2)
        views = [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
    assert all(v["status"] == "SUCCESS" for v in views)
    assert all([a["status"] for a in v["callback"]["attempts"]] == [500, 200] for v in views)
    time.sleep(1.0)  # a duplicate sent late would show now
    records = _log(receiver_link) or []
    by_delivery: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_delivery[record["headers"]["Plughost-Delivery"]].append(record)
    assert len(by_delivery) == JOBS
    assert {json.loads(r["body"])["id"] for r in records} == set(ids)
    # One failed and one successful attempt per delivery: never sent twice at once.
    assert sorted(len(sent) for sent in by_delivery.values()) == [2] * JOBS
    now = time.time()
    for record in records:
        signature = record["headers"]["Plughost-Signature"]
        assert verify(secret, record["body"].encode(), signature, now)


def test_a_batch_run_on_two_worker_nodes_delivers_one_callback_and_none_per_item(
    api, workers, db_url: str, receiver_link: Link
):
    from tests.cluster.test_batches import nodes_of

    allow = {
        "callback_allow": [receiver_link.node_ip],
        "callback_allow_networks": ["10.231.0.0/16"],
        "callback_backoff_s": 0.2,
    }
    # Every node delivers: the API node and both worker nodes claim from one outbox.
    services = api(**allow)
    env = {
        "PLUGHOST_CALLBACK_ALLOW": receiver_link.node_ip,
        "PLUGHOST_CALLBACK_ALLOW_NETWORKS": "10.231.0.0/16",
        "PLUGHOST_CALLBACK_BACKOFF_S": "0.2",
    }
    workers.start("--workers", "2", env=env)
    workers.start("--workers", "2", env=env)
    wait_for(lambda: live_workers(services) == 2, 60, "two live workers")
    app = create_app(Settings(self_check=False, **allow), services)
    url = f"http://{receiver_link.node_ip}:{PORT}/batch"
    items = [BODY] * 60
    with TestClient(app) as client:
        secret = client.get("/v1/callbacks/secret").json()["secret"]
        answer = client.post(
            "/v1/batches", json={"plugin": "echo", "items": items, "callback_url": url}
        )
        assert answer.status_code == 202, answer.text
        batch_id = answer.json()["id"]

        def settled() -> bool:
            view = client.get(f"/v1/batches/{batch_id}").json()
            return view.get("callback", {}).get("state") in ("DELIVERED", "FAILED")

        wait_for(settled, 180, "the batch's callback settled", every_s=0.2)
        view = client.get(f"/v1/batches/{batch_id}?limit=100").json()
    assert view["counts"] == {"SUCCESS": 60}
    assert view["callback"]["state"] == "DELIVERED"
    assert [a["status"] for a in view["callback"]["attempts"]] == [200]
    assert len(nodes_of(db_url, batch_id)) == 2
    time.sleep(1.5)  # a duplicate, or an item's own callback, would show now
    records = _log(receiver_link) or []
    assert [r["path"] for r in records] == ["/batch"]  # one POST, no item's
    (record,) = records
    headers = record["headers"]
    assert headers["Plughost-Event"] == "batch.finished"
    assert verify(secret, record["body"].encode(), headers["Plughost-Signature"], time.time())
    sent = json.loads(record["body"])
    assert sent["id"] == batch_id and sent["counts"] == {"SUCCESS": 60}
    assert len(sent["items"]) == 60 and sent["items_truncated"] is False


def test_a_batch_ended_by_a_node_giving_up_on_its_item_delivers_its_callback(
    api, workers, receiver_link: Link
):
    allow = {
        "callback_allow": [receiver_link.node_ip],
        "callback_allow_networks": ["10.231.0.0/16"],
        "callback_backoff_s": 0.2,
    }
    services = api(**allow)
    env = {
        "PLUGHOST_CALLBACK_ALLOW": receiver_link.node_ip,
        "PLUGHOST_CALLBACK_ALLOW_NETWORKS": "10.231.0.0/16",
        "PLUGHOST_MAX_ATTEMPTS": "1",
    }
    first = workers.start(env=env)
    wait_for(lambda: live_workers(services) == 1, 60, "a live worker")
    app = create_app(Settings(self_check=False, **allow), services)
    url = f"http://{receiver_link.node_ip}:{PORT}/given-up"
    item = {**BODY, "options": {"s": 60}}
    with TestClient(app) as client:
        answer = client.post(
            "/v1/batches", json={"plugin": "nap", "items": [item], "callback_url": url}
        )
        assert answer.status_code == 202, answer.text
        batch_id = answer.json()["id"]

        def running() -> bool:
            view = client.get(f"/v1/batches/{batch_id}").json()
            return bool(view["counts"].get("RUNNING"))

        wait_for(running, 60, "the item to start")
        workers.kill(first)  # its only attempt dies with it
        workers.start(env=env)

        def settled() -> bool:
            view = client.get(f"/v1/batches/{batch_id}").json()
            return view.get("callback", {}).get("state") in ("DELIVERED", "FAILED")

        wait_for(settled, 180, "the batch's callback settled", every_s=0.2)
        view = client.get(f"/v1/batches/{batch_id}").json()
    assert view["counts"] == {"INTERRUPTED": 1}
    assert view["callback"]["state"] == "DELIVERED"
    time.sleep(1.0)
    (record,) = _log(receiver_link) or []
    assert record["path"] == "/given-up"
    assert json.loads(record["body"])["counts"] == {"INTERRUPTED": 1}
