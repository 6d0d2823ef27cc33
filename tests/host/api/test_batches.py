"""Batches on a single node: many images for one plugin under one id. A
batch is admitted whole or not at all, its items are ordinary jobs fed to
the pool in turn (a later job of its own does not wait for the batch),
and its end is logged once."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from host.api.auth import principal_id
from host.errors import Rejected
from host.services import PluginManagementService, SQLiteJobStore
from host.services.batches import parse_batch
from host.services.batchrows import Batch, rows_of
from host.services.jobrows import Job, JobStatus, now_iso
from host.services.payloads import option_bounds
from host.services.store import JobStore, MemoryJobStore
from tests.conftest import make_png, wait_until
from tests.host.api.test_routes import assert_envelope
from tests.host.api.test_tenants import ADMIN, ALICE, BOB, TOKENS, wait_finished

ALICE_ID = principal_id("alice-secret-token")
TINY = base64.b64encode(make_png(2, 2)).decode()
# A PNG signature and nothing a decoder can read: admitted, and image_info fails on it.
BROKEN = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32).decode()


def item(image: str = TINY, **extra: object) -> dict[str, object]:
    return {"image": image, "mime_type": "image/png", **extra}


def batch_body(count: int, plugin: str = "image_info", **extra: object) -> dict[str, object]:
    return {"plugin": plugin, "items": [item() for _ in range(count)], **extra}


def wait_batch(client: TestClient, batch_id: str, who: dict[str, str], timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = client.get(f"/v1/batches/{batch_id}", headers=who).json()
        if found["status"] == "FINISHED":
            return found
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not finish: {found['counts']}")


def finished_lines(caplog: pytest.LogCaptureFixture, batch_id: str) -> int:
    return sum(
        1
        for r in caplog.records
        if r.getMessage() == "batch finished" and getattr(r, "batch_id", None) == batch_id
    )


def stored(client: TestClient, who: dict[str, str] = ALICE) -> tuple[int, int]:
    """`(jobs, batches)` the client sees."""
    jobs = client.get("/v1/jobs", headers=who).json()["total"]
    batches = client.get("/v1/batches", headers=who).json()["total"]
    return int(jobs), int(batches)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    if request.param == "memory":
        return MemoryJobStore()
    return SQLiteJobStore(tmp_path / "jobs.sqlite3")


def test_a_batch_of_100_tiny_images_ends_with_every_item_a_success_logged_once(
    make_client: Callable[..., TestClient], store: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plughost.batches")
    # A queue of 8: the batch is fed to the pool, not poured into it.
    client = make_client(workers=2, queue_size=8, store=store, **TOKENS)
    created = client.post("/v1/batches", json=batch_body(100), headers=ALICE)
    assert created.status_code == 202, created.text
    data = created.json()
    assert created.headers["Location"] == f"/v1/batches/{data['id']}"
    assert [i["index"] for i in data["items"]] == list(range(100))
    done = wait_batch(client, data["id"], ALICE)
    assert done["counts"] == {"SUCCESS": 100} and done["total"] == 100
    assert done["finished_at"] is not None
    assert [i["job_id"] for i in done["items"]] == [i["job_id"] for i in data["items"]]
    assert all(i["status"] == "SUCCESS" and i["result"]["width"] == 2 for i in done["items"])
    assert finished_lines(caplog, data["id"]) == 1
    # Each item is a job of its own.
    first = client.get(f"/v1/jobs/{data['items'][0]['job_id']}", headers=ALICE).json()
    assert first["status"] == "SUCCESS"
    assert stored(client) == (100, 1)


def test_one_failing_item_fails_alone_and_says_why(
    make_client: Callable[..., TestClient], store: JobStore
) -> None:
    client = make_client(store=store, **TOKENS)
    body = batch_body(10)
    body["items"][3] = item(BROKEN)  # type: ignore[index]
    data = client.post("/v1/batches", json=body, headers=ALICE).json()
    done = wait_batch(client, data["id"], ALICE)
    assert done["counts"] == {"SUCCESS": 9, "FAILED": 1}
    failed = done["items"][3]
    assert failed["status"] == "FAILED" and failed["result"] is None
    assert failed["error"]["type"] in ("ExecutionError", "ValidationError", "PluginError")
    assert failed["error"]["details"]["reason"] and failed["error"]["message"]
    assert "_internal" not in failed["error"]
    assert all(i["result"] for n, i in enumerate(done["items"]) if n != 3)


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (item("not base64!"), "is not valid base64"),
        ({"image": TINY, "mime_type": "image/jpeg"}, "but mime_type says image/jpeg"),
        ({"mime_type": "image/png"}, "field 'image' is missing"),
        (item(options=[1]), "field 'options' must be an object"),
        (item(plugin="image_info"), "belongs to the batch"),
        ("a string", "must be an object"),
    ],
)
def test_an_invalid_item_refuses_the_whole_batch_naming_its_index(
    make_client: Callable[..., TestClient], store: JobStore, bad: object, words: str
) -> None:
    client = make_client(store=store, **TOKENS)
    body = batch_body(5)
    body["items"][2] = bad  # type: ignore[index]
    refused = client.post("/v1/batches", json=body, headers=ALICE)
    assert refused.status_code == 400, refused.text
    error = refused.json()["detail"]
    assert error["details"]["reason"] == "invalid_input"
    assert error["details"]["index"] == 2
    assert error["message"].startswith("items[2]") and words in error["message"]
    assert stored(client) == (0, 0)


def test_an_oversized_item_is_refused_by_the_single_jobs_size_limit(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(**TOKENS)
    single = client.post("/v1/jobs", json={**body, "image": "A" * 8}, headers=ALICE)
    batch = batch_body(3)
    batch["items"][1] = item("A" * 8)  # type: ignore[index]
    refused = client.post("/v1/batches", json=batch, headers=ALICE)
    assert single.status_code == refused.status_code == 400
    message = refused.json()["detail"]["message"]
    assert message.startswith("items[1]: " + single.json()["detail"]["message"])


def test_more_items_than_max_batch_items_is_a_400_that_names_the_setting(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_batch_items=3, **TOKENS)
    refused = client.post("/v1/batches", json=batch_body(4), headers=ALICE)
    assert refused.status_code == 400
    error = refused.json()["detail"]
    assert "max_batch_items" in error["message"] and error["details"]["max_batch_items"] == 3
    empty = client.post("/v1/batches", json=batch_body(0), headers=ALICE)
    assert empty.status_code == 400
    assert stored(client) == (0, 0)
    assert client.post("/v1/batches", json=batch_body(3), headers=ALICE).status_code == 202


def test_a_batch_that_does_not_fit_the_quota_is_refused_whole(
    make_client: Callable[..., TestClient], store: JobStore
) -> None:
    client = make_client(store=store, max_jobs_per_client=5, **TOKENS)
    refused = client.post("/v1/batches", json=batch_body(6), headers=ALICE)
    assert refused.status_code == 429, refused.text
    error = refused.json()["detail"]
    assert error["details"]["reason"] == "quota_exceeded"
    assert "whole batch was refused" in error["message"]
    assert error["details"]["batch_jobs"] == 6 and error["details"]["limit"] == 5
    assert "Retry-After" in refused.headers
    assert stored(client) == (0, 0)
    accepted = client.post("/v1/batches", json=batch_body(5), headers=ALICE)
    assert accepted.status_code == 202
    wait_batch(client, accepted.json()["id"], ALICE)
    # Its finished jobs make room for the next batch, as for single jobs.
    again = client.post("/v1/batches", json=batch_body(4), headers=ALICE)
    assert again.status_code == 202, again.text


def test_a_batch_retried_with_its_idempotency_key_is_created_once(
    make_client: Callable[..., TestClient], store: JobStore
) -> None:
    client = make_client(store=store, **TOKENS)
    key = {**ALICE, "Idempotency-Key": "batch-7"}
    answers = [client.post("/v1/batches", json=batch_body(4), headers=key) for _ in range(3)]
    assert [a.status_code for a in answers] == [202] * 3
    assert len({a.json()["id"] for a in answers}) == 1
    assert len({tuple(i["job_id"] for i in a.json()["items"]) for a in answers}) == 1
    assert stored(client) == (4, 1)
    wait_batch(client, answers[0].json()["id"], ALICE)
    replayed = client.post("/v1/batches", json=batch_body(4), headers=key)
    assert replayed.status_code == 202 and replayed.json()["status"] == "FINISHED"
    other = client.post("/v1/batches", json=batch_body(5), headers=key)
    assert other.status_code == 409
    assert other.json()["detail"]["details"]["reason"] == "idempotency_key_reused"
    # Keys are per client.
    bobs = client.post(
        "/v1/batches", json=batch_body(4), headers={**BOB, "Idempotency-Key": "batch-7"}
    )
    assert bobs.status_code == 202 and bobs.json()["id"] != answers[0].json()["id"]
    assert stored(client) == (4, 1)


def test_another_clients_batch_is_a_404_and_the_admin_sees_it(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(**TOKENS)
    batch_id = client.post("/v1/batches", json=batch_body(2), headers=ALICE).json()["id"]
    for answer in (
        client.get(f"/v1/batches/{batch_id}", headers=BOB),
        client.delete(f"/v1/batches/{batch_id}", headers=BOB),
        client.get("/v1/batches/no-such-batch", headers=ALICE),
    ):
        assert answer.status_code == 404
        assert answer.json()["detail"]["details"]["reason"] == "not_found"
    assert client.get("/v1/batches", headers=BOB).json()["total"] == 0
    assert client.get(f"/v1/batches/{batch_id}", headers=ADMIN).status_code == 200
    listed = client.get("/v1/batches", headers=ALICE).json()
    assert [b["id"] for b in listed["batches"]] == [batch_id] and listed["next_offset"] is None


def test_cancelling_a_batch_cancels_every_unfinished_item(
    make_client: Callable[..., TestClient], store: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plughost.batches")
    client = make_client(store=store, **TOKENS)
    data = client.post("/v1/batches", json=batch_body(6, "sleep_forever"), headers=ALICE).json()
    cancelled = client.delete(f"/v1/batches/{data['id']}", headers=ALICE)
    assert cancelled.status_code == 200, cancelled.text
    view = cancelled.json()
    assert view["status"] == "FINISHED" and view["finished_at"] is not None
    assert view["counts"].get("CANCELLED", 0) >= 4
    assert sum(view["counts"].values()) == 6
    assert not {"PENDING", "RUNNING"} & set(view["counts"])
    assert finished_lines(caplog, data["id"]) == 1
    again = client.delete(f"/v1/batches/{data['id']}", headers=ALICE)
    assert again.status_code == 409


def test_a_job_submitted_after_a_batch_of_100_starts_before_the_batch_ends(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(workers=2, queue_size=8, **TOKENS)
    batch_id = client.post("/v1/batches", json=batch_body(100), headers=ALICE).json()["id"]
    job_id = client.post("/v1/jobs", json=body, headers=BOB).json()["job"]["id"]
    single = wait_finished(client, job_id, BOB)
    assert single["status"] == "SUCCESS"
    done = wait_batch(client, batch_id, ALICE)
    before = [i for i in done["items"] if i["finished_at"] < single["started_at"]]
    # It waited for the items already in the pool (2 running, and their
    # successors fed as it was submitted), not for the batch.
    assert len(before) <= 10, len(before)
    assert single["started_at"] < done["finished_at"]


def test_the_items_of_a_batch_page_within_max_list_bytes(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_list_bytes=64 * 1024, **TOKENS)
    batch_id = client.post("/v1/batches", json=batch_body(40), headers=ALICE).json()["id"]
    wait_batch(client, batch_id, ALICE)
    seen: list[int] = []
    offset: int | None = 0
    while offset is not None:
        page = client.get(f"/v1/batches/{batch_id}?limit=15&offset={offset}", headers=ALICE)
        assert len(page.content) <= 64 * 1024 + 1024
        data = page.json()
        seen += [i["index"] for i in data["items"]]
        offset = data["next_offset"]
    assert seen == list(range(40))


def test_the_documented_batch_example_is_accepted(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    operation = client.get("/openapi.json").json()["paths"]["/v1/batches"]["post"]
    examples = operation["requestBody"]["content"]["application/json"]["examples"]
    for example in examples.values():
        created = client.post("/v1/batches", json=example["value"])
        assert created.status_code == 202, created.text
        assert wait_batch(client, created.json()["id"], {})["counts"] == {"SUCCESS": 2}


def test_a_batch_cut_short_by_a_restart_ends_at_the_next_start(
    make_client: Callable[..., TestClient], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plughost.batches")
    path = tmp_path / "jobs.sqlite3"
    first = SQLiteJobStore(path)
    job = Job("j1", "image_info", JobStatus.PENDING, now_iso(), owner=ALICE_ID)
    with rows_of(first) as rows:
        rows.insert(
            Batch("b1", ALICE_ID, "image_info", now_iso(), ("j1",)),
            [(job, {"image": base64.b64decode(TINY), "mime_type": "image/png", "options": {}})],
            None,
        )
    first.close()  # as a host that stopped with the batch unfinished
    client = make_client(store=SQLiteJobStore(path), **TOKENS)
    found = client.get("/v1/batches/b1", headers=ALICE).json()
    assert found["counts"] == {"INTERRUPTED": 1} and found["finished_at"] is not None
    assert finished_lines(caplog, "b1") == 1


def test_racing_retries_of_a_batch_create_it_once(
    make_client: Callable[..., TestClient], store: JobStore
) -> None:
    client = make_client(store=store, **TOKENS)
    start = threading.Barrier(6)

    def send(_: int) -> str:
        start.wait(timeout=10)
        answer = client.post(
            "/v1/batches", json=batch_body(3), headers={**ALICE, "Idempotency-Key": "race"}
        )
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    with ThreadPoolExecutor(6) as pool:
        assert len(set(pool.map(send, range(6)))) == 1
    assert stored(client) == (3, 1)


def big_options(total: int) -> dict[str, str]:
    """Options of about `total` bytes, each string within options_max_string_bytes."""
    return {f"k{n}": "x" * 50_000 for n in range(total // 50_000)}


def test_batch_options_copied_into_every_item_are_held_to_max_request_bytes(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_request_bytes=512 * 1024, **TOKENS)
    # 200 KB of options in a body within the limit would be 100 items x 200 KB once copied.
    refused = client.post(
        "/v1/batches", json=batch_body(100, options=big_options(200_000)), headers=ALICE
    )
    assert refused.status_code == 400, refused.text
    error = refused.json()["detail"]
    assert error["details"]["reason"] == "invalid_input"
    assert "max_request_bytes" in error["message"] and "'options'" in error["message"]
    assert error["details"]["items_inheriting"] == 100
    assert stored(client) == (0, 0)
    # Items that give their own options copy nothing; a small batch fits.
    own = batch_body(100, options=big_options(200_000))
    own["items"] = [item(options={}) for _ in range(100)]
    assert client.post("/v1/batches", json=own, headers=ALICE).status_code == 202
    two = batch_body(2, options=big_options(200_000))
    assert client.post("/v1/batches", json=two, headers=ALICE).status_code == 202


def test_parsing_a_batch_costs_a_bounded_multiple_of_its_body() -> None:
    bounds = option_bounds(16, 10_000, 64 * 1024)
    body = json.dumps(batch_body(100, options=big_options(1_000_000))).encode()
    tracemalloc.start()
    try:
        with pytest.raises(Rejected, match="max_request_bytes"):
            parse_batch(bytearray(body), bounds, 100, 32 * 1024 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Not 100 copies of the options (100 MB): a few times the body at most.
    assert peak < 4 * len(body), (peak, len(body))


@pytest.mark.parametrize(
    "path", ["/v1/batches", "/v1/batches/{id}", "/v1/jobs"], ids=["batches", "items", "jobs"]
)
def test_an_offset_past_the_stores_integers_is_a_400_naming_it(
    make_client: Callable[..., TestClient], tmp_path: Path, path: str
) -> None:
    client = make_client(store=SQLiteJobStore(tmp_path / "jobs.sqlite3"), **TOKENS)
    batch_id = client.post("/v1/batches", json=batch_body(1), headers=ALICE).json()["id"]
    where = path.format(id=batch_id)
    for offset in (2**63, 10**30):
        answer = client.get(f"{where}?offset={offset}", headers=ALICE)
        assert answer.status_code == 400, answer.text
        assert answer.json()["detail"]["details"]["problems"][0]["field"] == "query.offset"
    last = client.get(f"{where}?offset=1000000000", headers=ALICE)
    assert last.status_code == 200 and last.json()["next_offset"] is None


def test_a_client_with_many_batches_gets_no_more_turns_than_one_with_a_single_batch(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(workers=1, queue_size=8, **TOKENS)
    # The one worker held, so every batch below is waiting when feeding starts.
    holder = client.post("/v1/batches", json=batch_body(1, "sleep_forever"), headers=ALICE)
    alices = [
        client.post("/v1/batches", json=batch_body(5), headers=ALICE).json()["id"]
        for _ in range(10)
    ]
    bobs = client.post("/v1/batches", json=batch_body(5), headers=BOB).json()["id"]
    assert client.delete(f"/v1/batches/{holder.json()['id']}", headers=ALICE).status_code == 200
    bob_done = wait_batch(client, bobs, BOB)
    last = max(i["started_at"] for i in bob_done["items"])
    alice_before = sum(
        1
        for batch_id in alices
        for i in wait_batch(client, batch_id, ALICE)["items"]
        if i["started_at"] < last
    )
    # Turns alternate between the two clients: not one of Bob's per ten of Alice's batches.
    assert alice_before <= 6, alice_before


def test_one_idempotency_key_stands_for_one_request_across_jobs_and_batches(
    make_client: Callable[..., TestClient], store: JobStore, body: dict
) -> None:
    client = make_client(store=store, **TOKENS)
    first = {**ALICE, "Idempotency-Key": "job-first"}
    job = client.post("/v1/jobs", json=body, headers=first)
    assert job.status_code == 202, job.text
    refused = client.post("/v1/batches", json=batch_body(1), headers=first)
    assert refused.status_code == 409, refused.text
    error = refused.json()["detail"]
    assert error["details"]["reason"] == "idempotency_key_reused"
    assert error["details"]["job_id"] == job.json()["job"]["id"]
    assert "POST /v1/jobs" in error["message"]
    other = {**ALICE, "Idempotency-Key": "batch-first"}
    batch = client.post("/v1/batches", json=batch_body(2), headers=other)
    assert batch.status_code == 202, batch.text
    again = client.post("/v1/jobs", json=body, headers=other)
    assert again.status_code == 409, again.text
    assert again.json()["detail"]["details"]["reason"] == "idempotency_key_reused"
    # The batch itself is still replayed under its key.
    replay = client.post("/v1/batches", json=batch_body(2), headers=other)
    assert replay.status_code == 202 and replay.json()["id"] == batch.json()["id"]
    assert stored(client) == (3, 1)


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What threads of the host raised and did not catch."""
    errors: list[str] = []
    monkeypatch.setattr(
        threading, "excepthook", lambda args: errors.append(f"{args.thread}: {args.exc_value!r}")
    )
    return errors


@pytest.mark.timeout(30)
def test_a_batch_being_fed_as_the_host_stops_starting_leaves_its_items_pending(
    make_client: Callable[..., TestClient],
    body: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    thread_errors: list[str],
) -> None:
    # The feeder took the next item as a running one ended, and the pool's
    # admission refused it with ShuttingDown (Overloaded before the pool
    # could stop starting): the feeder thread died on it, a traceback in
    # the host's log on every SIGTERM that found a batch unfinished.
    release = threading.Event()

    def held(*_: object, **__: object) -> tuple[dict[str, object], dict[str, object]]:
        release.wait(20)
        return {"ok": True}, {}

    monkeypatch.setattr(PluginManagementService, "execute_plugin", held)
    path = tmp_path / "jobs.sqlite3"
    client = make_client(workers=2, queue_size=4, store=SQLiteJobStore(path), **TOKENS)
    jobs = client.app.state.services.jobs
    batch_id = client.post("/v1/batches", json=batch_body(5), headers=ALICE).json()["id"]
    wait_until(lambda: jobs.stats()["running"] == 2)
    jobs.stop_starting()
    release.set()  # the running items end: the feeder looks for the next
    wait_until(lambda: jobs.stats()["running"] == 0)
    time.sleep(0.3)
    jobs.shutdown(timeout_s=5)
    assert thread_errors == []
    store = SQLiteJobStore(path)
    try:
        with rows_of(store) as rows:
            counts = rows.counts(batch_id)
    finally:
        store.close()
    assert counts == {"SUCCESS": 2, "INTERRUPTED": 3}


def test_a_batch_asked_for_as_the_host_stops_is_refused_like_a_job(
    make_client: Callable[..., TestClient], body: dict, thread_errors: list[str]
) -> None:
    # A POST whose body was still arriving at SIGTERM: /v1/jobs answers 503
    # shutting_down; /v1/batches stored the batch (202) for items the host
    # would never start, and its feeder thread died on the pool's refusal.
    client = make_client(**TOKENS)
    client.app.state.services.jobs.stop_starting()
    assert_envelope(client.post("/v1/jobs", json=body, headers=ALICE), 503, "shutting_down")
    refused = client.post("/v1/batches", json=batch_body(3), headers=ALICE)
    detail = assert_envelope(refused, 503, "shutting_down")
    assert refused.headers["Retry-After"] and "no new job" in detail["message"]
    assert stored(client) == (0, 0)
    time.sleep(0.2)
    assert thread_errors == []
