"""Completion callbacks on a single node: one signed POST of the job's public
view per ended job, retried with backoff, never redirected, bounded in time
and in what is read; destinations the operator's policy refuses are refused
at submit and again at delivery; a pending callback survives a restart."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from host.api import Services, create_app
from host.config import Settings
from host.registry import PluginRegistry
from host.services import (
    AnalysisService,
    JobManagementService,
    MemoryJobStore,
    PluginManagementService,
    SQLiteJobStore,
)
from host.services.build import job_limits
from host.services.callbacks import callback_service, file_secret
from host.services.store import JobStore
from sandbox.supervisor import Sandbox
from tests.callback_receiver import SLOW_S, TRICKLE_S, Receiver
from tests.host.api.test_console import sign_in
from tests.host.api.test_routes import assert_envelope
from tests.host.api.test_tenants import ALICE, BOB, TOKENS, wait_finished

ROOT = Path(__file__).resolve().parents[3]
LOOPBACK = {
    "callback_allow": ["127.0.0.1"],
    "callback_allow_networks": ["127.0.0.0/8"],
    "callback_backoff_s": 0.05,
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


@pytest.fixture
def make_host(
    registry: PluginRegistry, sandbox: Sandbox, tmp_path: Path
) -> Iterator[Callable[..., TestClient]]:
    """A TestClient of a host with callbacks (settings as keywords); its
    deliverer runs unless `deliver=False`; `resolver` replaces DNS, `ca_file`
    the system's certificates."""
    made: list[TestClient] = []

    def make(
        store: JobStore | None = None,
        deliver: bool = True,
        resolver: Callable[[str, int], list[str]] | None = None,
        ca_file: str | None = None,
        **settings: Any,
    ) -> TestClient:
        config = Settings(self_check=False, state_dir=str(tmp_path / "state"), **settings)
        plugins = PluginManagementService(registry, sandbox)
        jobs = JobManagementService(
            plugins, store or MemoryJobStore(), workers=2, queue_size=8, limits=job_limits(config)
        )
        jobs.callbacks = callback_service(config, jobs.store, file_secret(config.state_dir))
        if resolver is not None or ca_file is not None:
            policy = jobs.callbacks.config.policy
            jobs.callbacks.config = replace(
                jobs.callbacks.config,
                policy=replace(policy, resolver=resolver or policy.resolver),
                ca_file=ca_file,
            )
        if deliver:
            jobs.callbacks.start()
        services = Services(plugins, jobs, AnalysisService(jobs, "image_info"))
        client = TestClient(create_app(config, services), raise_server_exceptions=False)
        client.__enter__()
        made.append(client)
        return client

    yield make
    for client in made:
        client.__exit__(None, None, None)


def settled(client: TestClient, job_id: str, who: dict[str, str] = ALICE) -> dict[str, Any]:
    """The job once its callback is DELIVERED or FAILED."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=who).json()
        if job.get("callback", {}).get("state") in ("DELIVERED", "FAILED"):
            return dict(job)
        time.sleep(0.05)
    raise AssertionError(f"the callback of job {job_id} did not settle: {job}")


def documented_verify() -> Callable[[str, bytes, str], bool]:
    """The `verify` function of docs/callbacks.md, as printed there."""
    text = (ROOT / "docs" / "callbacks.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S)
    assert snippet is not None
    space: dict[str, Any] = {}
    exec(snippet[1], space)  # noqa: S102 (the project's own documentation)
    verify: Callable[[str, bytes, str], bool] = space["verify"]
    return verify


def submit(client: TestClient, body: dict, url: str, plugin: str = "image_info") -> str:
    answer = client.post(
        "/v1/jobs", json={**body, "plugin": plugin, "callback_url": url}, headers=ALICE
    )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["job"]["id"])


def test_each_ended_job_gets_one_signed_post_of_its_public_view(
    make_host: Callable[..., TestClient], receiver: Receiver, body: dict
) -> None:
    client = make_host(**LOOPBACK, **TOKENS)
    url = receiver.url("/ok")
    ids = {
        "SUCCESS": submit(client, body, url),
        "FAILED": submit(client, body, url, "raise_kaboom"),
        "CANCELLED": submit(client, body, url, "sleep_forever"),
    }
    client.delete(f"/v1/jobs/{ids['CANCELLED']}", headers=ALICE)
    secret = client.get("/v1/callbacks/secret", headers=ALICE).json()["secret"]
    verify = documented_verify()
    for status, job_id in ids.items():
        job = settled(client, job_id)
        assert job["status"] == status
        assert job["callback"]["state"] == "DELIVERED"
        assert [a["status"] for a in job["callback"]["attempts"]] == [200]
    records = receiver.records("/ok")
    assert len(records) == 3
    for record in records:
        headers = {k.lower(): v for k, v in record["headers"].items()}
        sent = json.loads(record["body"])
        assert headers["plughost-event"] == "job.finished"
        assert verify(secret, record["body"].encode(), headers["plughost-signature"])
        assert not verify(secret, record["body"].encode() + b" ", headers["plughost-signature"])
        view = client.get(f"/v1/jobs/{sent['id']}", headers=ALICE).json()
        assert {k: v for k, v in sent.items() if k != "callback"} == {
            k: v for k, v in view.items() if k != "callback"
        }
        assert sent["callback"]["url"] == url
    assert {json.loads(r["body"])["id"] for r in records} == set(ids.values())
    listed = client.get("/v1/jobs", headers=ALICE).json()["jobs"]
    assert {j["id"]: j["callback"]["state"] for j in listed} == dict.fromkeys(
        ids.values(), "DELIVERED"
    )


def test_another_clients_secret_does_not_verify(
    make_host: Callable[..., TestClient], receiver: Receiver, body: dict
) -> None:
    client = make_host(**LOOPBACK, **TOKENS)
    settled(client, submit(client, body, receiver.url("/ok")))
    bob = client.get("/v1/callbacks/secret", headers={"Authorization": "Bearer bob-secret-token"})
    alice = client.get("/v1/callbacks/secret", headers=ALICE).json()["secret"]
    assert bob.json()["secret"] != alice
    (record,) = receiver.records("/ok")
    signature = {k.lower(): v for k, v in record["headers"].items()}["plughost-signature"]
    assert not documented_verify()(bob.json()["secret"], record["body"].encode(), signature)


def test_two_failures_then_success_is_three_attempts_and_delivered(
    make_host: Callable[..., TestClient], receiver: Receiver, body: dict
) -> None:
    client = make_host(**{**LOOPBACK, "callback_backoff_s": 0.3}, **TOKENS)
    job = settled(client, submit(client, body, receiver.url("/flaky/2")))
    callback = job["callback"]
    assert callback["state"] == "DELIVERED"
    assert [a["status"] for a in callback["attempts"]] == [500, 500, 200]
    assert "answered 500" in callback["attempts"][0]["error"]
    records = receiver.records("/flaky/2")
    assert len(records) == 3
    deliveries = {r["headers"]["Plughost-Delivery"] for r in records}
    assert len(deliveries) == 1  # the same delivery, retried
    gaps = [b["at"] - a["at"] for a, b in zip(records, records[1:], strict=False)]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6  # backoff doubles: 0.3 s, then 0.6 s


def test_a_redirect_is_not_followed(
    make_host: Callable[..., TestClient], receiver: Receiver, body: dict
) -> None:
    client = make_host(**LOOPBACK, **TOKENS, callback_max_attempts=2)
    job = settled(client, submit(client, body, receiver.url("/redirect")))
    assert job["callback"]["state"] == "FAILED"
    attempts = job["callback"]["attempts"]
    assert [a["status"] for a in attempts] == [302, 302]
    assert "not followed" in attempts[0]["error"]
    assert receiver.records("/target") == []


def test_a_slow_receiver_is_given_up_at_the_timeout(
    make_host: Callable[..., TestClient], receiver: Receiver, body: dict
) -> None:
    client = make_host(**LOOPBACK, **TOKENS, callback_max_attempts=1, callback_timeout_s=1.0)
    job = settled(client, submit(client, body, receiver.url("/slow")))
    (attempt,) = job["callback"]["attempts"]
    assert job["callback"]["state"] == "FAILED"
    assert attempt["error"] == "no complete answer within 1 s"
    assert 900 <= attempt["duration_ms"] < SLOW_S * 1000


def test_one_clients_tarpit_does_not_hold_back_anothers_callbacks(
    make_host: Callable[..., TestClient], receiver: Receiver, body: dict
) -> None:
    """A client whose receivers never answer in time takes at most its share
    of a node's deliverers: another client's callback goes out meanwhile."""
    client = make_host(**{**LOOPBACK, "callback_backoff_s": 0.5}, callback_timeout_s=1.0, **TOKENS)
    for _ in range(12):  # a client's callbacks to a receiver that never answers in time
        wait_finished(client, submit(client, body, receiver.url("/slow")), ALICE)
    answer = client.post(
        "/v1/jobs", json={**body, "callback_url": receiver.url("/ok")}, headers=BOB
    )
    assert answer.status_code == 202, answer.text
    job = wait_finished(client, answer.json()["job"]["id"], BOB)
    settled(client, job["id"], BOB)
    (record,) = receiver.records("/ok")
    waited = record["at"] - datetime.fromisoformat(job["finished_at"]).timestamp()
    # A deliverer is free at once (sharing them out by round, one waited
    # behind rounds of the other client's 1 s timeouts: 6.7-6.9 s).
    assert waited < 2.0, f"the other client's callback waited {waited:.2f} s"


def test_a_huge_answer_is_read_only_up_to_the_cap(
    make_host: Callable[..., TestClient], receiver: Receiver, body: dict
) -> None:
    client = make_host(**LOOPBACK, **TOKENS)
    job = settled(client, submit(client, body, receiver.url("/huge")))
    assert job["callback"]["state"] == "DELIVERED"
    deadline = time.monotonic() + 10
    while receiver.server.cut_short == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert receiver.server.cut_short == 1  # the host hung up before 8 MiB were read


def test_what_a_non_http_service_answers_is_not_shown(
    make_host: Callable[..., TestClient], body: dict
) -> None:
    # An allowed internal service that speaks another protocol: its first
    # line must not reach the client through the attempt's error.
    server = socket.create_server(("127.0.0.1", 0))
    served = threading.Event()

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"-ERR SECRET-4711 internal data\r\n")
        served.set()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        client = make_host(**LOOPBACK, **TOKENS, callback_max_attempts=1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/"
        job = settled(client, submit(client, body, url))
        assert served.is_set()
        (attempt,) = job["callback"]["attempts"]
        assert job["callback"]["state"] == "FAILED"
        assert "SECRET-4711" not in json.dumps(job), attempt
        assert "not an HTTP answer" in attempt["error"]
    finally:
        server.close()
        thread.join(10)


ANY_HOST = {"callback_allow": ["*"]}


@pytest.mark.parametrize(
    ("settings", "url", "words"),
    [
        (ANY_HOST, "http://127.0.0.1:9/x", "127.0.0.1, a loopback address"),
        (ANY_HOST, "http://169.254.169.254/latest/meta-data", "a link-local address"),
        (ANY_HOST, "http://10.0.0.5/hook", "10.0.0.5, a private address"),
        (ANY_HOST, "http://[::1]:9/x", "::1, a loopback address"),
        (ANY_HOST, "http://[::ffff:127.0.0.1]:9/x", "a loopback address (IPv4-mapped)"),
        (ANY_HOST, "http://localhost:9/x", "127.0.0.1, a loopback address"),
        (ANY_HOST, "http://224.0.0.1/x", "a multicast address"),
        (ANY_HOST, "http://0.0.0.0:9/x", "the unspecified address"),
        (ANY_HOST, "http://2130706433:9/x", "127.0.0.1, a loopback address"),
        (ANY_HOST, "http://0177.0.0.1:9/x", "127.0.0.1, a loopback address"),
        (ANY_HOST, "http://127.1:9/x", "127.0.0.1, a loopback address"),
        (ANY_HOST, "http://0:9/x", "the unspecified address"),
        (ANY_HOST, "http://LOCALHOST:9/x", "a loopback address"),
        (ANY_HOST, "http://[::]:9/x", "the unspecified address"),
        (ANY_HOST, "http://[0:0:0:0:0:ffff:127.0.0.1]:9/x", "loopback address (IPv4-mapped)"),
        (ANY_HOST, "http://[64:ff9b::7f00:1]:9/x", "a reserved address"),  # NAT64
        (ANY_HOST, "http://[2002:7f00:1::]:9/x", "a loopback address (6to4)"),
        (ANY_HOST, "http://[2002:a9fe:a9fe::]/latest", "a link-local address"),
        (ANY_HOST, "http://[2002:a00:5::1]/hook", "a private address (6to4)"),
        (ANY_HOST, "http://[fec0::1]/x", "a site-local address"),
        (LOOPBACK, "http://127.0.0.1:8000/v1/jobs", "this host's own API port"),
        ({"callback_allow": ["hooks.example.com"]}, "http://other.example.org/", "matches none"),
        ({}, "http://hooks.example.com/", "callbacks are not enabled on this host"),
        (ANY_HOST, "ftp://hooks.example.com/", "http:// or https://"),
        (ANY_HOST, "https://user:pw@hooks.example.com/", "user name or password"),
        (ANY_HOST, "https://hooks.example.com/#frag", "fragment"),
        (ANY_HOST, "https://hooks.example.com/" + "a" * 2100, "longer than 2048"),
        (ANY_HOST, "/relative/path", "http:// or https://"),
    ],
)
def test_a_refused_destination_is_a_400_saying_why(
    make_host: Callable[..., TestClient], body: dict, settings: dict, url: str, words: str
) -> None:
    client = make_host(**settings, **TOKENS)
    answer = client.post("/v1/jobs", json={**body, "callback_url": url}, headers=ALICE)
    detail = assert_envelope(answer, 400, "invalid_input")
    assert words in detail["message"], detail["message"]
    assert client.get("/v1/jobs", headers=ALICE).json()["total"] == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3:8000/v1/jobs",
        "http://[::ffff:10.1.2.3]:8000/v1/jobs",
        "http://[::ffff:a01:203]:8000/v1/jobs",
    ],
)
def test_the_own_api_port_is_refused_on_every_form_of_an_own_address(
    make_host: Callable[..., TestClient],
    body: dict,
    monkeypatch: pytest.MonkeyPatch,
    url: str,
) -> None:
    # The host's own address lies in a network its operator allows (an
    # internal receiver's): its API port stays refused, IPv4-mapped too.
    from host.services import destinations

    own = {ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")}
    monkeypatch.setattr(destinations, "own_addresses", lambda: own)
    client = make_host(callback_allow=["*"], callback_allow_networks=["10.0.0.0/8"], **TOKENS)
    answer = client.post("/v1/jobs", json={**body, "callback_url": url}, headers=ALICE)
    assert "this host's own API port" in assert_envelope(answer, 400, "invalid_input")["message"]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://evil.net\\.example.com/", "must be a DNS name"),  # a DNS escape
        ("http://evil.net;.example.com/", "must be a DNS name"),
        ("http://evil.net%2f.example.com/", "must be a DNS name"),
        ("http://hooks.example.com:0/", "port must be 1 to 65535"),
    ],
)
def test_a_host_a_resolver_reads_otherwise_is_refused(
    make_host: Callable[..., TestClient], body: dict, url: str, words: str
) -> None:
    # Each ends like an allowed domain; a resolver that answers anything
    # stands for one that reads it its own way.
    client = make_host(
        callback_allow=["*.example.com"], resolver=lambda host, port: ["93.184.216.34"], **TOKENS
    )
    answer = client.post("/v1/jobs", json={**body, "callback_url": url}, headers=ALICE)
    assert words in assert_envelope(answer, 400, "invalid_input")["message"]


def test_an_allowed_network_lets_a_private_destination_through(
    make_host: Callable[..., TestClient], body: dict
) -> None:
    client = make_host(callback_allow=["*"], callback_allow_networks=["10.0.0.0/8"], **TOKENS)
    answer = client.post(
        "/v1/jobs", json={**body, "callback_url": "http://10.0.0.5/hook"}, headers=ALICE
    )
    assert answer.status_code == 202, answer.text


def test_analyze_takes_no_callback_url(make_host: Callable[..., TestClient], body: dict) -> None:
    client = make_host(**LOOPBACK)
    answer = client.post("/v1/analyze", json={**body, "callback_url": "http://127.0.0.1:9/"})
    assert "POST /v1/jobs" in assert_envelope(answer, 400, "invalid_input")["message"]


def test_a_destination_that_turns_private_after_submit_is_refused_and_nothing_sent(
    make_host: Callable[..., TestClient], receiver: Receiver, body: dict
) -> None:
    answers = iter([["93.184.216.34"]])

    def resolver(host: str, port: int) -> list[str]:
        return next(answers, ["127.0.0.1"])  # public at submit, loopback at delivery

    client = make_host(
        callback_allow=["hooks.example.com"], resolver=resolver, callback_max_attempts=3, **TOKENS
    )
    url = f"http://hooks.example.com:{receiver.port}/ok"
    job = settled(client, submit(client, body, url))
    (attempt,) = job["callback"]["attempts"]
    assert job["callback"]["state"] == "FAILED"
    assert "resolves to 127.0.0.1, a loopback address" in attempt["error"]
    assert receiver.records() == []


def test_a_pending_callback_is_delivered_after_a_restart(
    make_host: Callable[..., TestClient], receiver: Receiver, body: dict, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.sqlite3"
    first = make_host(store=SQLiteJobStore(path), deliver=False, **LOOPBACK, **TOKENS)
    job_id = submit(first, body, receiver.url("/ok"))
    job = wait_finished(first, job_id, ALICE)
    assert job["callback"]["state"] == "PENDING"
    first.__exit__(None, None, None)  # the host stops before it sent the callback
    assert receiver.records() == []
    second = make_host(store=SQLiteJobStore(path), **LOOPBACK, **TOKENS)
    assert settled(second, job_id)["callback"]["state"] == "DELIVERED"
    assert len(receiver.records("/ok")) == 1


def self_signed(directory: Path, name: str) -> tuple[str, str]:
    """A certificate for DNS name `name` (no IP address in it) and its key."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}"]
        + ["-addext", f"subjectAltName=DNS:{name}"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(cert), str(key)


@pytest.mark.parametrize(("certified", "delivered"), [("hooks.test", True), ("other.test", False)])
def test_https_goes_to_the_checked_address_and_verifies_the_name(
    make_host: Callable[..., TestClient],
    body: dict,
    tmp_path: Path,
    certified: str,
    delivered: bool,
) -> None:
    cert, key = self_signed(tmp_path, certified)
    tls = Receiver(tls=(cert, key))
    try:
        client = make_host(
            callback_allow=["hooks.test"],
            callback_allow_networks=["127.0.0.0/8"],
            callback_max_attempts=1,
            resolver=lambda host, port: ["127.0.0.1"],
            ca_file=cert,
            **TOKENS,
        )
        job = settled(client, submit(client, body, f"https://hooks.test:{tls.port}/ok"))
        (attempt,) = job["callback"]["attempts"]
        if delivered:  # the certificate names hooks.test only: SNI and checks used the name
            assert attempt["status"] == 200 and job["callback"]["state"] == "DELIVERED"
            (record,) = tls.records("/ok")
            assert record["headers"]["Host"] == f"hooks.test:{tls.port}"
        else:
            assert "certificate verify failed" in attempt["error"], attempt
            assert tls.records() == []
    finally:
        tls.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_trickling_receiver_is_cut_at_the_total_deadline(
    make_host: Callable[..., TestClient], body: dict, tmp_path: Path, scheme: str
) -> None:
    # A byte before every read timeout must not stretch an attempt past
    # callback_timeout_s in all, over TLS as over plain HTTP.
    cert, key = self_signed(tmp_path, "hooks.test")
    trickler = Receiver(tls=(cert, key) if scheme == "https" else None)
    try:
        client = make_host(
            callback_allow=["hooks.test"],
            callback_allow_networks=["127.0.0.0/8"],
            callback_max_attempts=1,
            callback_timeout_s=1.0,
            resolver=lambda host, port: ["127.0.0.1"],
            ca_file=cert,
            **TOKENS,
        )
        url = f"{scheme}://hooks.test:{trickler.port}/trickle"
        job = settled(client, submit(client, body, url))
        (attempt,) = job["callback"]["attempts"]
        assert job["callback"]["state"] == "FAILED", attempt
        assert attempt["error"] == "no complete answer within 1 s"
        assert 900 <= attempt["duration_ms"] < TRICKLE_S * 1000 / 2
    finally:
        trickler.close()


def test_openapi_documents_the_field_the_headers_and_the_secret_route(
    make_host: Callable[..., TestClient],
) -> None:
    schema = make_host(**LOOPBACK).get("/openapi.json").json()
    create = schema["paths"]["/v1/jobs"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert "callback_url" in body["properties"]
    for header in ("Plughost-Signature", "Plughost-Event", "Plughost-Delivery"):
        assert header in create["description"]
    assert "HMAC-SHA256" in create["description"]
    assert "get" in schema["paths"]["/v1/callbacks/secret"]
    job = schema["components"]["schemas"]["JobModel"]["properties"]
    assert "callback" in job


def test_the_secret_route_says_when_callbacks_are_off(
    make_host: Callable[..., TestClient],
) -> None:
    answer = make_host().get("/v1/callbacks/secret")
    assert "not enabled" in assert_envelope(answer, 400, "invalid_input")["message"]


def test_the_host_secret_is_kept_private_and_stable(
    make_host: Callable[..., TestClient], tmp_path: Path
) -> None:
    first = make_host(**LOOPBACK).get("/v1/callbacks/secret").json()["secret"]
    kept = tmp_path / "state" / "callback-secret"
    assert kept.stat().st_mode & 0o777 == 0o600
    assert make_host(**LOOPBACK).get("/v1/callbacks/secret").json()["secret"] == first


@pytest.mark.no_leak_check  # the server is a process of its own
def test_plughost_serve_delivers_callbacks_and_refuses_its_own_port(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.host.test_serve import BODY, free_port, request, start_server, stop

    monkeypatch.setenv("PLUGHOST_CALLBACK_ALLOW", "127.0.0.1")
    monkeypatch.setenv("PLUGHOST_CALLBACK_ALLOW_NETWORKS", "127.0.0.0/8")
    port = free_port()
    state = tmp_path / "state"
    server = start_server(tmp_path / "jobs.sqlite3", port, "--state-dir", str(state))
    try:
        own = {**BODY, "callback_url": f"http://127.0.0.1:{port}/v1/jobs"}
        status, data = request(port, "POST", "/v1/jobs", own)
        assert status == 400 and "own API port" in data["detail"]["message"]
        status, data = request(
            port, "POST", "/v1/jobs", {**BODY, "callback_url": receiver.url("/ok")}
        )
        assert status == 202, data
        job_id = data["job"]["id"]
        deadline = time.monotonic() + 30
        while not receiver.records("/ok") and time.monotonic() < deadline:
            time.sleep(0.05)
        (record,) = receiver.records("/ok")
        secret = request(port, "GET", "/v1/callbacks/secret")[1]["secret"]
        signature = record["headers"]["Plughost-Signature"]
        assert documented_verify()(secret, record["body"].encode(), signature)
        assert json.loads(record["body"])["id"] == job_id
    finally:
        stop(server)
    assert (state / "callback-secret").stat().st_mode & 0o777 == 0o600


@pytest.mark.no_leak_check  # the server is a process of its own
def test_plughost_serve_on_port_0_refuses_the_port_it_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.host.test_serve import BODY, HOSTILE_DIR, request, stop

    monkeypatch.setenv("PLUGHOST_CALLBACK_ALLOW", "127.0.0.1")
    monkeypatch.setenv("PLUGHOST_CALLBACK_ALLOW_NETWORKS", "127.0.0.0/8")
    log = tmp_path / "serve.log"
    with log.open("wb") as stream:  # a file, not a pipe: a full pipe would block the server
        server = subprocess.Popen(
            [sys.executable, "-m", "host.cli", "serve", "--port", "0", "--workers", "1"]
            + ["--db", str(tmp_path / "jobs.sqlite3"), "--state-dir", str(tmp_path / "state")]
            + ["--plugins-dir", str(HOSTILE_DIR)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stream,
        )
    try:
        deadline = time.monotonic() + 30
        found = None
        while found is None and time.monotonic() < deadline and server.poll() is None:
            found = re.search(r"serving on http://127\.0\.0\.1:(\d+)", log.read_text())
            time.sleep(0.05)
        assert found is not None, log.read_text()[-2000:]
        port = int(found[1])
        own = {**BODY, "callback_url": f"http://127.0.0.1:{port}/v1/jobs"}
        status, data = request(port, "POST", "/v1/jobs", own)
        assert status == 400 and "own API port" in data["detail"]["message"], data
    finally:
        stop(server)


def test_the_same_idempotency_key_with_another_callback_url_is_a_409(
    make_host: Callable[..., TestClient], receiver: Receiver, body: dict
) -> None:
    client = make_host(**LOOPBACK, **TOKENS)
    keyed = {**ALICE, "Idempotency-Key": "cb-1"}
    first = {**body, "callback_url": receiver.url("/ok")}
    answers = [client.post("/v1/jobs", json=first, headers=keyed) for _ in range(2)]
    assert [a.status_code for a in answers] == [202, 202]
    assert answers[0].json()["job"]["id"] == answers[1].json()["job"]["id"]
    other = {**body, "callback_url": receiver.url("/elsewhere")}
    answer = client.post("/v1/jobs", json=other, headers=keyed)
    assert_envelope(answer, 409, "idempotency_key_reused")
    settled(client, answers[0].json()["job"]["id"])
    assert len(receiver.records()) == 1  # one job, one callback


def test_a_job_left_unfinished_by_a_crash_ends_interrupted_and_its_callback_goes_out(
    make_host: Callable[..., TestClient], receiver: Receiver, tmp_path: Path
) -> None:
    from host.services.callbackstore import new_callback, outbox_for
    from host.services.store import Job, JobStatus, now_iso

    path = tmp_path / "jobs.sqlite3"
    crashed = SQLiteJobStore(path)  # what a host that died mid-job left behind
    owner = "client-" + "0" * 16
    job = Job("left-running", "image_info", JobStatus.RUNNING, now_iso(), owner=owner)
    crashed.add(job, None)
    outbox_for(crashed).add(new_callback(owner, "job", job.id, receiver.url("/ok"), time.time()))
    crashed.close()
    make_host(store=SQLiteJobStore(path), **LOOPBACK)
    deadline = time.monotonic() + 30
    while not receiver.records("/ok") and time.monotonic() < deadline:
        time.sleep(0.05)
    (record,) = receiver.records("/ok")
    sent = json.loads(record["body"])
    assert sent["id"] == job.id and sent["status"] == "INTERRUPTED"


def test_a_jobs_console_page_shows_its_callback_and_each_attempt(
    make_host: Callable[..., TestClient], receiver: Receiver, body: dict
) -> None:
    client = make_host(**{**LOOPBACK, "callback_backoff_s": 0.05}, **TOKENS)
    url = receiver.url("/flaky/1")
    job_id = submit(client, body, url)
    assert settled(client, job_id)["callback"]["state"] == "DELIVERED"
    sign_in(client, ALICE["Authorization"].removeprefix("Bearer "))
    page = client.get(f"/console/jobs/{job_id}").text
    assert 'data-testid="callback"' in page and f"<code>{url}</code>" in page
    assert re.search(r'data-testid="callback-state"[^>]*>DELIVERED<', page)
    attempts = re.findall(r'<tr data-testid="callback-attempt">(.*?)</tr>', page, re.S)
    assert len(attempts) == 2 and "HTTP 500" in attempts[0] and "HTTP 200" in attempts[1]
    # A job without a callback has no such section.
    plain = client.post("/v1/jobs", json=body, headers=ALICE).json()["job"]["id"]
    assert 'data-testid="callback"' not in client.get(f"/console/jobs/{plain}").text
