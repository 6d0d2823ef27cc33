"""Idempotency keys on the routes that create a job: a retried request with
the client's `Idempotency-Key` gets the original job and creates nothing,
also when retries race; the key with a different request is a 409; keys are
per client; a bad key is a 400 naming the header."""

from __future__ import annotations

import base64
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient

from host.discovery import discover
from host.registry import PluginRegistry
from host.services import SQLiteJobStore
from host.services.jobrows import Idempotency
from host.services.store import JobStore, MemoryJobStore
from tests.conftest import write_plugin
from tests.host.api.test_routes import assert_envelope
from tests.host.api.test_tenants import ALICE, BOB, TOKENS, wait_finished

CREATING = ("/v1/jobs", "/v1/analyze", "/v1/analyze/upload")


def keyed(key: str, who: dict[str, str] = ALICE) -> dict[str, str]:
    return {**who, "Idempotency-Key": key}


def submit(
    client: TestClient, route: str, body: dict, headers: Mapping[str, str]
) -> httpx.Response:
    """`body` sent to `route`: as JSON, or as a multipart upload."""
    if route != "/v1/analyze/upload":
        return client.post(route, json=body, headers=headers)
    return client.post(
        route,
        files={"file": ("p.png", base64.b64decode(body["image"]), body["mime_type"])},
        data={"plugin": body.get("plugin", "image_info"), "options": "{}"},
        headers=headers,
    )


def job_id(response: httpx.Response) -> str:
    data = response.json()
    return str(data["job"]["id"] if "job" in data else data["job_id"])


def total(client: TestClient, who: dict[str, str] = ALICE) -> int:
    return int(client.get("/v1/jobs", headers=who).json()["total"])


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    if request.param == "memory":
        return MemoryJobStore()
    return SQLiteJobStore(tmp_path / "jobs.sqlite3")


@pytest.mark.parametrize("route", CREATING)
def test_a_request_retried_three_times_with_one_key_is_one_job(
    make_client: Callable[..., TestClient], store: JobStore, body: dict, route: str
) -> None:
    client = make_client(store=store, **TOKENS)
    answers = [submit(client, route, body, keyed("retry-1")) for _ in range(3)]
    assert {job_id(answer) for answer in answers} == {job_id(answers[0])}
    first = answers[0]
    if route == "/v1/jobs":
        assert [a.status_code for a in answers] == [202] * 3
        assert {a.headers["Location"] for a in answers} == {f"/v1/jobs/{job_id(first)}"}
        wait_finished(client, job_id(first), ALICE)
        again = submit(client, route, body, keyed("retry-1"))
        assert again.status_code == 202 and again.json()["job"]["status"] == "SUCCESS"
    else:
        assert [a.status_code for a in answers] == [200] * 3
        assert all(a.json()["result"] == first.json()["result"] for a in answers)
    assert total(client) == 1


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/analyze"])
def test_concurrent_submissions_with_one_key_create_one_job(
    make_client: Callable[..., TestClient], store: JobStore, body: dict, route: str
) -> None:
    client = make_client(store=store, workers=2, queue_size=16, **TOKENS)
    start = threading.Barrier(8)

    def send(_: int) -> httpx.Response:
        start.wait(timeout=10)
        return submit(client, route, body, keyed("race-1"))

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))
    assert all(a.status_code in (200, 202) for a in answers), [a.text for a in answers]
    assert len({job_id(a) for a in answers}) == 1
    assert total(client) == 1


@pytest.mark.parametrize("route", CREATING)
def test_the_same_key_with_a_different_request_is_a_409(
    make_client: Callable[..., TestClient], body: dict, png: bytes, route: str
) -> None:
    client = make_client(**TOKENS)
    first = submit(client, route, body, keyed("k"))
    assert first.status_code in (200, 202)
    other_image = {**body, "image": base64.b64encode(png + b"\0").decode()}
    other_plugin = {**body, "plugin": "image_hash"}
    for changed in (other_image, other_plugin):
        detail = assert_envelope(
            submit(client, route, changed, keyed("k")), 409, "idempotency_key_reused"
        )
        assert "different request" in detail["message"]
        assert detail["details"]["job_id"] == job_id(first)
    if route != "/v1/analyze/upload":
        changed = {**body, "options": {"x": 1}}
        assert_envelope(submit(client, route, changed, keyed("k")), 409, "idempotency_key_reused")
    assert job_id(submit(client, route, body, keyed("k"))) == job_id(first)
    assert total(client) == 1


def test_the_same_image_as_json_or_as_a_file_is_the_same_request(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(**TOKENS)
    sent = client.post("/v1/analyze", json={**body, "plugin": "image_info"}, headers=keyed("j"))
    uploaded = submit(client, "/v1/analyze/upload", body, keyed("j"))
    assert uploaded.status_code == 200 and job_id(uploaded) == job_id(sent)


def test_another_clients_same_key_is_independent(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(**TOKENS)
    alices = client.post("/v1/jobs", json=body, headers=keyed("shared"))
    bobs = client.post("/v1/jobs", json=body, headers=keyed("shared", BOB))
    assert alices.status_code == bobs.status_code == 202
    assert job_id(alices) != job_id(bobs)
    assert bobs.json()["job"]["owner"] != alices.json()["job"]["owner"]
    other = {**body, "options": {"x": 1}}
    assert client.post("/v1/jobs", json=other, headers=keyed("mine", BOB)).status_code == 202
    assert total(client) == 1 and total(client, BOB) == 2


@pytest.mark.parametrize("route", CREATING)
@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "a\x7fb", "tab\there"])
def test_a_bad_idempotency_key_is_a_400_naming_the_header(
    make_client: Callable[..., TestClient], body: dict, route: str, key: str
) -> None:
    client = make_client(**TOKENS)
    headers = [*ALICE.items(), ("Idempotency-Key", key.encode("utf-8"))]
    response = submit(client, route, body, httpx.Headers(headers))
    detail = assert_envelope(response, 400, "invalid_input")
    assert "Idempotency-Key" in detail["message"]
    assert detail["details"]["header"] == "Idempotency-Key"
    assert total(client) == 0


def test_a_key_of_255_printable_characters_is_taken(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(**TOKENS)
    key = "".join(chr(32 + n % 95) for n in range(255)).strip()
    assert client.post("/v1/jobs", json=body, headers=keyed(key)).status_code == 202


def _nap_plugin(registry: PluginRegistry, root: Path) -> None:
    """`nap`: sleeps a second, returns a value of its own run (os.urandom)."""
    write_plugin(root, "nap", "time.sleep(1)\nreturn {'run': os.urandom(8).hex()}")
    discover(registry, [root])


@pytest.mark.parametrize("first_route", ["/v1/analyze", "/v1/jobs"])
def test_a_retried_analyze_waits_for_the_running_job_and_answers_its_result(
    make_client: Callable[..., TestClient],
    registry: PluginRegistry,
    tmp_path: Path,
    body: dict,
    first_route: str,
) -> None:
    _nap_plugin(registry, tmp_path / "plugins")
    client = make_client(**TOKENS)
    nap = {**body, "plugin": "nap"}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, first_route, json=nap, headers=keyed("nap"))
        running = wait_for_status(client, "RUNNING")
        retried = client.post("/v1/analyze", json=nap, headers=keyed("nap"))
        created = first.result(timeout=60)
    assert retried.status_code == 200, retried.text
    assert retried.json()["job_id"] == running == job_id(created)
    if first_route == "/v1/analyze":
        assert created.status_code == 200
        assert retried.json() == created.json()  # the one run's result, twice
    done = client.get(f"/v1/jobs/{running}", headers=ALICE).json()
    assert done["status"] == "SUCCESS" and done["result"] == retried.json()["result"]
    assert total(client) == 1


@pytest.mark.parametrize("first_route", ["/v1/analyze", "/v1/jobs"])
def test_a_retry_arriving_before_the_job_is_handed_to_the_pool_waits_for_it(
    make_client: Callable[..., TestClient],
    registry: PluginRegistry,
    tmp_path: Path,
    body: dict,
    first_route: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first request stored its job and is slow to hand it to the pool:
    # the retry finds the job PENDING and known to no runner yet.
    _nap_plugin(registry, tmp_path / "plugins")
    client = make_client(**TOKENS)
    runner = client.app.state.services.jobs.runner
    submit, stored = runner.submit, threading.Event()

    def slow_submit(job_id: str) -> Future:
        stored.set()
        time.sleep(0.5)
        return submit(job_id)

    monkeypatch.setattr(runner, "submit", slow_submit)
    nap = {**body, "plugin": "nap"}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, first_route, json=nap, headers=keyed("early"))
        assert stored.wait(30)
        retried = client.post("/v1/analyze", json=nap, headers=keyed("early"))
        created = first.result(timeout=60)
    assert retried.status_code == 200, retried.text
    assert retried.json()["job_id"] == job_id(created)
    assert "run" in retried.json()["result"]  # the job's result, not 202's job view
    if first_route == "/v1/analyze":
        assert retried.json() == created.json()
    assert total(client) == 1


def test_a_retried_analyze_answers_the_jobs_error(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(**TOKENS)
    slow = {**body, "plugin": "sleep_forever"}  # times out after 1 s
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/v1/analyze", json=slow, headers=keyed("slow"))
        wait_for_status(client, "RUNNING")
        retried = client.post("/v1/analyze", json=slow, headers=keyed("slow"))
        created = first.result(timeout=60)
    assert created.status_code >= 400
    assert (retried.status_code, retried.json()) == (created.status_code, created.json())
    assert total(client) == 1


def wait_for_status(client: TestClient, status: str) -> str:
    """The id of ALICE's only job, once it is in `status`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        jobs = client.get("/v1/jobs", headers=ALICE).json()["jobs"]
        if jobs and jobs[0]["status"] == status:
            return str(jobs[0]["id"])
        time.sleep(0.02)
    raise AssertionError(f"no job of ALICE became {status} within 30 s")


def test_the_openapi_schema_documents_the_header_on_each_creating_route(
    client: TestClient,
) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for route in CREATING:
        parameters = paths[route]["post"].get("parameters", [])
        header = [p for p in parameters if p["name"] == "Idempotency-Key"]
        assert len(header) == 1, route
        assert header[0]["in"] == "header" and not header[0]["required"]
        assert "409" in header[0]["description"] and header[0]["schema"]["maxLength"] == 255
    assert not any(
        p["name"] == "Idempotency-Key" for p in paths["/v1/jobs"]["get"].get("parameters", [])
    )


def test_an_older_sqlite_database_gains_the_key_columns(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(db)  # the schema of the version before idempotency keys
    old.execute(
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY, plugin TEXT NOT NULL, status TEXT NOT NULL,
            created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT,
            result TEXT, error TEXT, payload TEXT,
            owner TEXT NOT NULL DEFAULT 'anonymous', image BLOB,
            stored_bytes INTEGER NOT NULL DEFAULT 0)"""
    )
    old.execute(
        "INSERT INTO jobs (id, plugin, status, created_at) "
        "VALUES ('old1', 'image_info', 'PENDING', '2030-01-01T00:00:00+00:00')"
    )
    old.commit()
    old.close()
    store = SQLiteJobStore(db)
    try:
        old_job = store.get("old1")
        assert old_job is not None and store.keyed("anonymous", "k") is None
        idem = Idempotency("k", "d")
        assert store.add(replace(old_job, id="new1"), None, idem) is None
        held = store.add(replace(old_job, id="new2"), None, idem)
        assert held is not None and held[0].id == "new1"
    finally:
        store.close()
    with closing(sqlite3.connect(db)) as reopened:
        columns = {row[1] for row in reopened.execute("PRAGMA table_info(jobs)")}
    assert {"idem_key", "request_hash"} <= columns
