"""Completion callbacks of batches on a single node: one signed POST of the
batch's view when the batch ends (its last item, a cancel, or a restart's
end of a batch a stopped host left), none of its items' own; the URL is
checked as a job's is, and is part of the batch's idempotency digest."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from host.services import SQLiteJobStore
from host.services.batchrows import Batch, rows_of
from host.services.batchview import batch_body as callback_body
from host.services.callbackstore import new_callback, outbox_for
from host.services.jobrows import Job, JobStatus, now_iso
from tests.callback_receiver import Receiver
from tests.host.api import test_callbacks
from tests.host.api.test_batches import ALICE_ID, BROKEN, batch_body, item, stored, wait_batch
from tests.host.api.test_callbacks import LOOPBACK, documented_verify
from tests.host.api.test_routes import assert_envelope
from tests.host.api.test_tenants import ALICE, BOB, TOKENS

# The fixtures of the jobs' callback tests: a host with callbacks, a receiver.
make_host = test_callbacks.make_host
receiver = test_callbacks.receiver


def settled(client: TestClient, batch_id: str, timeout_s: float = 120) -> dict[str, Any]:
    """The batch once its callback is DELIVERED or FAILED."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = client.get(f"/v1/batches/{batch_id}", headers=ALICE).json()
        if found.get("callback", {}).get("state") in ("DELIVERED", "FAILED"):
            return dict(found)
        time.sleep(0.05)
    raise AssertionError(f"the callback of batch {batch_id} did not settle: {found}")


def submit(client: TestClient, body: dict[str, Any], url: str) -> str:
    answer = client.post("/v1/batches", json={**body, "callback_url": url}, headers=ALICE)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def test_a_batch_of_100_gets_one_signed_post_of_its_view_and_its_items_none(
    make_host: Callable[..., TestClient], receiver: Receiver
) -> None:
    client = make_host(workers=2, queue_size=8, **LOOPBACK, **TOKENS)
    batch_id = submit(client, batch_body(100), receiver.url("/ok"))
    found = settled(client, batch_id)
    assert found["callback"]["state"] == "DELIVERED"
    assert [a["status"] for a in found["callback"]["attempts"]] == [200]
    time.sleep(0.5)  # room for a stray item callback to arrive
    (record,) = receiver.records()
    assert record["path"] == "/ok"
    headers = {k.lower(): v for k, v in record["headers"].items()}
    assert headers["plughost-event"] == "batch.finished"
    secret = client.get("/v1/callbacks/secret", headers=ALICE).json()["secret"]
    verify = documented_verify()
    assert verify(secret, record["body"].encode(), headers["plughost-signature"])
    assert not verify(secret, record["body"].encode() + b" ", headers["plughost-signature"])
    sent = json.loads(record["body"])
    assert sent["id"] == batch_id and sent["status"] == "FINISHED"
    assert sent["total"] == 100 and sent["counts"] == {"SUCCESS": 100}
    assert [i["index"] for i in sent["items"]] == list(range(100))
    assert all(i["status"] == "SUCCESS" and i["result"] for i in sent["items"])
    assert sent["items_truncated"] is False and sent["next_offset"] is None
    assert sent["callback"]["url"] == receiver.url("/ok")
    assert sent["callback"]["state"] == "DELIVERING"
    # The same view GET gives (its callback aside).
    view = client.get(f"/v1/batches/{batch_id}?limit=100", headers=ALICE).json()
    assert {k: v for k, v in view.items() if k != "callback"} == {
        k: v for k, v in sent.items() if k not in ("callback", "items_truncated", "limit")
    } | {"limit": 100}
    for index in (0, 99):
        job = client.get(f"/v1/jobs/{sent['items'][index]['job_id']}", headers=ALICE).json()
        assert "callback" not in job  # an item gets none of its own


def test_a_batch_with_a_failing_item_gets_one_callback_with_its_counts(
    make_host: Callable[..., TestClient], receiver: Receiver
) -> None:
    client = make_host(**LOOPBACK, **TOKENS)
    body = {"plugin": "image_info", "items": [item(), item(BROKEN), item()]}
    batch_id = submit(client, body, receiver.url("/ok"))
    settled(client, batch_id)
    (record,) = receiver.records()
    sent = json.loads(record["body"])
    assert sent["counts"] == {"SUCCESS": 2, "FAILED": 1}
    assert sent["items"][1]["status"] == "FAILED" and sent["items"][1]["error"]


def test_a_cancelled_batch_gets_one_callback(
    make_host: Callable[..., TestClient], receiver: Receiver
) -> None:
    client = make_host(workers=1, queue_size=8, **LOOPBACK, **TOKENS)
    batch_id = submit(client, batch_body(6, "sleep_forever"), receiver.url("/ok"))
    answer = client.delete(f"/v1/batches/{batch_id}", headers=ALICE)
    assert answer.status_code == 200, answer.text
    assert answer.json()["callback"]["url"] == receiver.url("/ok")
    settled(client, batch_id)
    time.sleep(0.5)
    (record,) = receiver.records()
    sent = json.loads(record["body"])
    assert sent["status"] == "FINISHED" and sent["counts"] == {"CANCELLED": 6}


def test_a_refused_destination_is_a_400_and_nothing_is_stored(
    make_host: Callable[..., TestClient], receiver: Receiver
) -> None:
    client = make_host(**LOOPBACK, **TOKENS)
    refused = {**batch_body(2), "callback_url": "http://10.1.2.3/hook"}
    answer = client.post("/v1/batches", json=refused, headers=ALICE)
    assert_envelope(answer, 400, "invalid_input")
    # The message POST /v1/jobs gives for the same URL.
    job = {**item(), "plugin": "image_info", "callback_url": "http://10.1.2.3/hook"}
    same = client.post("/v1/jobs", json=job, headers=ALICE)
    assert answer.json()["detail"]["message"] == same.json()["detail"]["message"]
    assert "10.1.2.3" in answer.json()["detail"]["message"]
    assert stored(client) == (0, 0)
    outbox = client.app.state.services.jobs.callbacks.outbox
    assert outbox.sweep(time.time() + 3600) == 0  # no callback row was written either
    not_text = client.post("/v1/batches", json={**batch_body(1), "callback_url": 7}, headers=ALICE)
    assert_envelope(not_text, 400, "invalid_input")
    assert "callback_url" in not_text.json()["detail"]["message"]
    in_item = {"plugin": "image_info", "items": [item(callback_url=receiver.url("/ok"))]}
    answer = client.post("/v1/batches", json=in_item, headers=ALICE)
    assert_envelope(answer, 400, "invalid_input")
    assert (
        "items[0]: field 'callback_url' belongs to the batch" in answer.json()["detail"]["message"]
    )
    assert stored(client) == (0, 0)


def test_callbacks_off_refuse_a_batch_callback_url(
    make_host: Callable[..., TestClient], receiver: Receiver
) -> None:
    client = make_host(**TOKENS)
    url = receiver.url("/ok")
    answer = client.post("/v1/batches", json={**batch_body(1), "callback_url": url}, headers=ALICE)
    assert_envelope(answer, 400, "invalid_input")
    job = {**item(), "plugin": "image_info", "callback_url": url}
    same = client.post("/v1/jobs", json=job, headers=ALICE)
    assert_envelope(same, 400, "invalid_input")
    assert answer.json()["detail"]["message"] == same.json()["detail"]["message"]
    assert stored(client) == (0, 0)


def test_the_same_idempotency_key_with_another_callback_url_is_a_409(
    make_host: Callable[..., TestClient], receiver: Receiver
) -> None:
    client = make_host(**LOOPBACK, **TOKENS)
    keyed = {**ALICE, "Idempotency-Key": "batch-cb-1"}
    first = {**batch_body(2), "callback_url": receiver.url("/ok")}
    answers = [client.post("/v1/batches", json=first, headers=keyed) for _ in range(2)]
    assert [a.status_code for a in answers] == [202, 202]
    assert answers[0].json()["id"] == answers[1].json()["id"]
    other = {**batch_body(2), "callback_url": receiver.url("/elsewhere")}
    assert_envelope(
        client.post("/v1/batches", json=other, headers=keyed), 409, "idempotency_key_reused"
    )
    bare = client.post("/v1/batches", json=batch_body(2), headers=keyed)
    assert_envelope(bare, 409, "idempotency_key_reused")
    settled(client, answers[0].json()["id"])
    time.sleep(0.3)
    assert len(receiver.records()) == 1  # one batch, one callback


def test_a_pending_batch_callback_is_delivered_after_a_restart(
    make_host: Callable[..., TestClient], receiver: Receiver, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.sqlite3"
    first = make_host(store=SQLiteJobStore(path), deliver=False, **LOOPBACK, **TOKENS)
    batch_id = submit(first, batch_body(3), receiver.url("/ok"))
    found = wait_batch(first, batch_id, ALICE)
    assert found["callback"]["state"] == "PENDING"
    first.__exit__(None, None, None)  # the host stops before it sent the callback
    assert receiver.records() == []
    second = make_host(store=SQLiteJobStore(path), **LOOPBACK, **TOKENS)
    assert settled(second, batch_id)["callback"]["state"] == "DELIVERED"
    (record,) = receiver.records("/ok")
    assert json.loads(record["body"])["counts"] == {"SUCCESS": 3}


def test_a_batch_a_stopped_host_left_ends_at_the_next_start_and_its_callback_goes_out(
    make_host: Callable[..., TestClient], receiver: Receiver, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.sqlite3"
    crashed = SQLiteJobStore(path)  # what a host that died mid-batch left behind
    jobs = [
        Job(f"left-{n}", "image_info", JobStatus.RUNNING, now_iso(), owner=ALICE_ID) for n in (1, 2)
    ]
    batch = Batch("left-batch", ALICE_ID, "image_info", now_iso(), tuple(j.id for j in jobs))
    with rows_of(crashed) as rows:
        rows.insert(batch, [(j, item()) for j in jobs], None)
    outbox_for(crashed).add(
        new_callback(ALICE_ID, "batch", batch.id, receiver.url("/ok"), time.time())
    )
    crashed.close()
    client = make_host(store=SQLiteJobStore(path), **LOOPBACK, **TOKENS)
    assert settled(client, batch.id)["callback"]["state"] == "DELIVERED"
    (record,) = receiver.records("/ok")
    assert json.loads(record["body"])["counts"] == {"INTERRUPTED": 2}


@pytest.mark.parametrize("images", [3, 40])
def test_a_body_past_the_cap_carries_the_first_page_and_says_so(
    make_host: Callable[..., TestClient], images: int
) -> None:
    client = make_host(**LOOPBACK, **TOKENS)
    store = client.app.state.services.jobs.store
    batch_id = submit(client, batch_body(images), "http://127.0.0.1:9/never")
    wait_batch(client, batch_id, ALICE)
    one = len(json.dumps(wait_batch(client, batch_id, ALICE)["items"][0]))
    sent = json.loads(callback_body(store, one * 10)(batch_id) or "null")
    assert sent["total"] == images
    if images <= 9:
        assert len(sent["items"]) == images and sent["items_truncated"] is False
        assert "items_next" not in sent
    else:
        shown = len(sent["items"])
        assert 1 <= shown < images and sent["items_truncated"] is True
        assert sent["items_next"] == f"/v1/batches/{batch_id}?offset={shown}"
    assert callback_body(store, 1 << 20)("no-such-batch") is None


def test_openapi_documents_the_batch_callback(make_host: Callable[..., TestClient]) -> None:
    schema = make_host(**LOOPBACK).get("/openapi.json").json()
    create = schema["paths"]["/v1/batches"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert "callback_url" in body["properties"]
    for words in ("Plughost-Event: batch.finished", "Plughost-Signature", "items_truncated"):
        assert words in create["description"]
    view = schema["components"]["schemas"]["BatchView"]["properties"]
    assert "callback" in view


def test_items_cancelled_one_by_one_end_the_batch_once_with_one_callback(
    make_host: Callable[..., TestClient], receiver: Receiver
) -> None:
    client = make_host(workers=1, queue_size=8, **LOOPBACK, **TOKENS)
    batch_id = submit(client, batch_body(4, "sleep_forever"), receiver.url("/ok"))
    items = client.get(f"/v1/batches/{batch_id}", headers=ALICE).json()["items"]
    for found in items:
        assert client.delete(f"/v1/jobs/{found['job_id']}", headers=BOB).status_code == 404
    for found in items:
        cancelled = client.delete(f"/v1/jobs/{found['job_id']}", headers=ALICE)
        assert cancelled.status_code == 200, cancelled.text
    view = settled(client, batch_id)
    assert view["status"] == "FINISHED" and view["counts"] == {"CANCELLED": 4}
    time.sleep(0.5)  # room for a second delivery to arrive
    (record,) = receiver.records()
    assert json.loads(record["body"])["counts"] == {"CANCELLED": 4}
    assert client.delete(f"/v1/batches/{batch_id}", headers=ALICE).status_code == 409


def test_a_batch_whose_plugin_is_quarantined_midway_fails_every_item_and_calls_back_once(
    make_host: Callable[..., TestClient], receiver: Receiver
) -> None:
    client = make_host(workers=2, queue_size=8, **LOOPBACK, **TOKENS)
    batch_id = submit(client, batch_body(10, "segfault"), receiver.url("/ok"))
    view = settled(client, batch_id)
    assert view["status"] == "FINISHED" and view["counts"] == {"FAILED": 10}
    reasons = {i["error"]["details"]["reason"] for i in view["items"]}
    assert reasons == {"crashed", "quarantined"}
    time.sleep(0.5)
    assert len(receiver.records()) == 1


def test_a_batchs_console_page_shows_its_callback(
    make_host: Callable[..., TestClient], receiver: Receiver
) -> None:
    from tests.host.api.test_console import sign_in

    client = make_host(workers=2, queue_size=8, **LOOPBACK, **TOKENS)
    batch_id = submit(client, batch_body(3), receiver.url("/ok"))
    assert settled(client, batch_id)["callback"]["state"] == "DELIVERED"
    sign_in(client, ALICE["Authorization"].removeprefix("Bearer "))
    page = client.get(f"/console/batches/{batch_id}").text
    assert 'data-testid="callback"' in page and f"<code>{receiver.url('/ok')}</code>" in page
    assert 'data-testid="callback-state">DELIVERED<' in page
    assert page.count('<tr data-testid="callback-attempt">') == 1 and "HTTP 200" in page
