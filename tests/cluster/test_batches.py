"""Batches on an API node of a multi-node deployment: the items are stored
and queued in one transaction, run on the worker nodes (item i at priority
-i, so a later job of its own does not wait for the batch), and the batch's
end is decided once in PostgreSQL, whichever node ends its last item."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from host.api.app import create_app
from host.config import Settings
from host.services.build import Services
from tests.cluster.conftest import CLUSTER, Workers, live_workers
from tests.cluster.pg import wait_for
from tests.conftest import make_png, write_plugin
from tests.host.api.test_tenants import ALICE, BOB, TOKENS

pytestmark = CLUSTER
TINY = base64.b64encode(make_png(2, 2)).decode()


@pytest.fixture
def plugins_dir(tmp_path: Path) -> Path:
    """`echo` (instant), `nap` (sleeps options.s), `picky` (raises when options.fail)."""
    root = tmp_path / "plugins"
    write_plugin(root, "echo", 'return {"size": len(payload["image"])}')
    write_plugin(
        root,
        "nap",
        'time.sleep(payload["options"].get("s", 1))\nreturn {"slept": True}',
        timeout_s=60,
    )
    write_plugin(
        root,
        "picky",
        'if payload["options"].get("fail"):\n    raise RuntimeError("picky refuses")\n'
        'return {"ok": True}',
    )
    return root


def batch_body(count: int, plugin: str = "echo", **options: object) -> dict[str, object]:
    return {
        "plugin": plugin,
        "items": [{"image": TINY, "mime_type": "image/png"} for _ in range(count)],
        "options": options,
    }


@pytest.fixture
def client(api: Callable[..., Services], workers: Workers) -> Iterator[TestClient]:
    """An API node's HTTP API, with two worker nodes of two slots each that log at info."""
    services = api(**TOKENS)
    for _ in range(2):
        workers.start("--workers", "2", "--log-level", "info")
    wait_for(lambda: live_workers(services) == 2, 60, "two live workers")
    app = create_app(Settings(self_check=False, **TOKENS), services)
    with TestClient(app) as found:
        yield found


def wait_batch(client: TestClient, batch_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = client.get(f"/v1/batches/{batch_id}", headers=ALICE).json()
        if found["status"] == "FINISHED" and found["finished_at"]:
            return found
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} did not finish: {found['counts']}")


def finished_lines(logs: Path, caplog: pytest.LogCaptureFixture, batch_id: str) -> int:
    """'batch finished' lines for the batch: in the worker nodes' logs and this process's."""
    found = 0
    for path in logs.glob("worker-*.log"):
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                found += record["message"] == "batch finished" and record["batch_id"] == batch_id
    return found + sum(
        1
        for r in caplog.records
        if r.getMessage() == "batch finished" and getattr(r, "batch_id", None) == batch_id
    )


def stored(url: str) -> tuple[int, int]:
    """`(jobs, batches)` in PostgreSQL."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT COUNT(*) FROM plughost_jobs), (SELECT COUNT(*) FROM plughost_batches)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def nodes_of(url: str, batch_id: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT DISTINCT node FROM plughost_jobs WHERE batch_id = %s", (batch_id,)
        ).fetchall()
    return {row[0] for row in rows}


def test_a_batch_of_100_runs_on_both_workers_and_ends_once(
    client: TestClient, db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plughost.batches")
    created = client.post("/v1/batches", json=batch_body(100), headers=ALICE)
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]
    done = wait_batch(client, batch_id)
    assert done["counts"] == {"SUCCESS": 100}
    assert all(i["status"] == "SUCCESS" and i["result"]["size"] for i in done["items"])
    assert len(nodes_of(db_url, batch_id)) == 2
    time.sleep(1)  # any second line would be written by now
    assert finished_lines(tmp_path, caplog, batch_id) == 1
    assert stored(db_url) == (100, 1)


def test_one_failing_item_of_a_batch_fails_alone(
    client: TestClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = batch_body(10, "picky")
    body["items"][4] = {"image": TINY, "mime_type": "image/png", "options": {"fail": True}}  # type: ignore[index]
    batch_id = client.post("/v1/batches", json=body, headers=ALICE).json()["id"]
    done = wait_batch(client, batch_id)
    assert done["counts"] == {"SUCCESS": 9, "FAILED": 1}
    failed = done["items"][4]
    assert failed["error"]["type"] == "ExecutionError"
    assert failed["error"]["message"] == "picky refuses"
    time.sleep(1)
    assert finished_lines(tmp_path, caplog, batch_id) == 1


def test_refused_batches_store_and_queue_nothing(client: TestClient, db_url: str) -> None:
    bad = batch_body(5)
    bad["items"][3] = {"image": TINY, "mime_type": "image/gif"}  # type: ignore[index]
    refused = client.post("/v1/batches", json=bad, headers=ALICE)
    assert refused.status_code == 400 and refused.json()["detail"]["details"]["index"] == 3
    assert client.post("/v1/batches", json=batch_body(101), headers=ALICE).status_code == 400
    with psycopg.connect(db_url) as conn:
        queued = conn.execute("SELECT COUNT(*) FROM procrastinate_jobs").fetchone()
    assert stored(db_url) == (0, 0) and queued == (0,)

    key = {**ALICE, "Idempotency-Key": "batch-1"}
    answers = [client.post("/v1/batches", json=batch_body(3), headers=key) for _ in range(3)]
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["id"] for a in answers}) == 1
    assert stored(db_url) == (3, 1)
    assert client.post("/v1/batches", json=batch_body(4), headers=key).status_code == 409
    batch_id = answers[0].json()["id"]
    assert client.get(f"/v1/batches/{batch_id}", headers=BOB).status_code == 404
    assert client.delete(f"/v1/batches/{batch_id}", headers=BOB).status_code == 404
    assert stored(db_url) == (3, 1)


def test_a_batch_over_the_quota_is_refused_whole(
    api: Callable[..., Services], workers: Workers, db_url: str
) -> None:
    services = api(max_jobs_per_client=5, **TOKENS)
    workers.start()
    wait_for(lambda: live_workers(services), 60, "a live worker")
    app = create_app(Settings(self_check=False, **TOKENS), services)
    with TestClient(app) as client:
        refused = client.post("/v1/batches", json=batch_body(6), headers=ALICE)
        assert refused.status_code == 429
        assert "whole batch was refused" in refused.json()["detail"]["message"]
        assert stored(db_url) == (0, 0)
        assert client.post("/v1/batches", json=batch_body(5), headers=ALICE).status_code == 202


def test_cancelling_a_batch_on_an_api_node_ends_every_item(
    client: TestClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plughost.batches")
    batch_id = client.post("/v1/batches", json=batch_body(8, "nap", s=30), headers=ALICE).json()[
        "id"
    ]
    time.sleep(1)  # some items start on the workers
    cancelled = client.delete(f"/v1/batches/{batch_id}", headers=ALICE)
    assert cancelled.status_code == 200, cancelled.text
    done = wait_batch(client, batch_id, timeout_s=60)
    assert done["counts"] == {"CANCELLED": 8}
    time.sleep(1)
    assert finished_lines(tmp_path, caplog, batch_id) == 1


def test_a_job_submitted_after_a_batch_of_100_starts_before_the_batch_ends(
    client: TestClient,
) -> None:
    batch_id = client.post("/v1/batches", json=batch_body(100, "nap", s=0.05), headers=ALICE)
    single = client.post(
        "/v1/jobs",
        json={"plugin": "nap", "image": TINY, "mime_type": "image/png", "options": {"s": 0.05}},
        headers=BOB,
    ).json()["job"]
    done = wait_batch(client, batch_id.json()["id"])
    job = client.get(f"/v1/jobs/{single['id']}", headers=BOB).json()
    assert job["status"] == "SUCCESS"
    before = [i for i in done["items"] if i["finished_at"] < job["started_at"]]
    # It waited for the first item and those already running, not for the batch.
    assert len(before) <= 20, len(before)
