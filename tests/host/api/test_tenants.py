"""Each client token is a principal: it sees, lists and cancels only its own
jobs; the admin token sees all; admin routes stay closed without one."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from host.services import SQLiteJobStore
from tests.host.api.test_routes import assert_envelope

ALICE = {"Authorization": "Bearer alice-secret-token"}
BOB = {"Authorization": "Bearer bob-secret-token"}
ADMIN = {"Authorization": "Bearer admin-secret-token"}
TOKENS = {
    "client_tokens": ["alice-secret-token", "bob-secret-token"],
    "admin_token": "admin-secret-token",
}


def wait_finished(client: TestClient, job_id: str, headers: dict[str, str]) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] not in ("PENDING", "RUNNING"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def test_another_clients_job_is_a_404_like_an_unknown_job(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(**TOKENS)
    created = client.post("/v1/jobs", json=body, headers=ALICE)
    assert created.status_code == 202
    job_id = created.json()["job"]["id"]
    wait_finished(client, job_id, ALICE)

    theirs = assert_envelope(client.get(f"/v1/jobs/{job_id}", headers=BOB), 404, "unknown_job")
    unknown = "0" * len(job_id)
    nobody = assert_envelope(client.get(f"/v1/jobs/{unknown}", headers=BOB), 404, "unknown_job")
    assert theirs["message"].replace(job_id, unknown) == nobody["message"]
    assert_envelope(client.delete(f"/v1/jobs/{job_id}", headers=BOB), 404, "unknown_job")

    mine = client.get(f"/v1/jobs/{job_id}", headers=ALICE).json()
    assert mine["status"] == "SUCCESS" and mine["result"]["format"] == "PNG"
    assert "alice-secret-token" not in mine["owner"]


def test_listing_shows_only_the_callers_jobs_and_the_admin_sees_all(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(**TOKENS)
    alice_ids = {client.post("/v1/jobs", json=body, headers=ALICE).json()["job"]["id"]}
    alice_ids.add(client.post("/v1/analyze", json=body, headers=ALICE).json()["job_id"])
    bob_ids = {client.post("/v1/analyze", json=body, headers=BOB).json()["job_id"]}
    for job_id in alice_ids:
        wait_finished(client, job_id, ALICE)

    alice = client.get("/v1/jobs", headers=ALICE).json()
    bob = client.get("/v1/jobs", headers=BOB).json()
    admin = client.get("/v1/jobs", headers=ADMIN).json()
    assert {j["id"] for j in alice["jobs"]} == alice_ids and alice["total"] == 2
    assert {j["id"] for j in bob["jobs"]} == bob_ids and bob["total"] == 1
    assert {j["id"] for j in admin["jobs"]} == alice_ids | bob_ids and admin["total"] == 3
    assert len({j["owner"] for j in admin["jobs"]}) == 2
    for job_id in alice_ids:
        assert client.get(f"/v1/jobs/{job_id}", headers=ADMIN).status_code == 200


def test_a_client_cannot_cancel_another_clients_running_job(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(**TOKENS)
    job_id = client.post(
        "/v1/jobs", json={**body, "plugin": "sleep_forever"}, headers=ALICE
    ).json()["job"]["id"]
    assert_envelope(client.delete(f"/v1/jobs/{job_id}", headers=BOB), 404, "unknown_job")
    assert client.get(f"/v1/jobs/{job_id}", headers=ALICE).json()["status"] in (
        "PENDING",
        "RUNNING",
    )
    cancelled = client.delete(f"/v1/jobs/{job_id}", headers=ALICE)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELLED"


def test_admin_routes_are_closed_when_no_admin_token_is_set(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()  # no tokens at all: the client API is open, admin is not
    assert_envelope(client.post("/v1/admin/reload"), 403, "forbidden")
    assert_envelope(client.post("/v1/admin/plugins/segfault/quarantine/reset"), 403, "forbidden")
    assert client.get("/v1/plugins").status_code == 200


def test_the_store_keeps_a_principal_id_never_the_token(
    make_client: Callable[..., TestClient], body: dict, tmp_path: Path
) -> None:
    db = tmp_path / "jobs.sqlite3"
    client = make_client(store=SQLiteJobStore(db), **TOKENS)
    job_id = client.post("/v1/analyze", json=body, headers=ALICE).json()["job_id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=ALICE).status_code == 200
    for path in tmp_path.iterdir():
        assert b"alice-secret-token" not in path.read_bytes(), path.name


def test_jobs_of_an_older_database_belong_to_anonymous(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    db = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(db)  # the schema of the version before owners
    old.execute(
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY, plugin TEXT NOT NULL, status TEXT NOT NULL,
            created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT,
            result TEXT, error TEXT, payload TEXT)"""
    )
    old.execute(
        "INSERT INTO jobs VALUES ('old1', 'image_info', 'SUCCESS', "
        "'2030-01-01T00:00:00+00:00', NULL, '2030-01-01T00:00:01+00:00', "
        """'{"format": "PNG"}', NULL, NULL)"""
    )
    old.commit()
    old.close()

    client = make_client(store=SQLiteJobStore(db), **TOKENS)
    assert_envelope(client.get("/v1/jobs/old1", headers=ALICE), 404, "unknown_job")
    assert client.get("/v1/jobs", headers=ALICE).json()["total"] == 0
    job = client.get("/v1/jobs/old1", headers=ADMIN).json()
    assert job["owner"] == "anonymous" and job["result"] == {"format": "PNG"}


def test_without_client_tokens_everyone_is_anonymous_and_sees_old_jobs(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client()
    job_id = client.post("/v1/analyze", json=body).json()["job_id"]
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["owner"] == "anonymous"
    assert client.get("/v1/jobs").json()["total"] == 1
