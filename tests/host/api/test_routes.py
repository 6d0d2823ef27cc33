"""Every route and every error status of the HTTP API, through TestClient."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

ADMIN = {"Authorization": "Bearer a-token"}


def assert_envelope(response, status: int, reason: str) -> dict:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert set(detail) == {"type", "message", "details", "plugin", "timestamp"}
    assert detail["details"]["reason"] == reason
    assert "_internal" not in response.text and "Traceback" not in response.text
    return detail


def test_analyze_returns_the_result(client: TestClient, body: dict) -> None:
    response = client.post("/v1/analyze", json={**body, "plugin": "image_info"})
    assert response.status_code == 200
    data = response.json()
    assert data["plugin"] == "image_info" and data["result"]["width"] == 64 and data["job_id"]


def test_analyze_without_plugin_uses_the_default(client: TestClient, body: dict) -> None:
    response = client.post("/v1/analyze", json=body)
    assert response.status_code == 200 and response.json()["plugin"] == "image_info"


@pytest.mark.parametrize(
    ("change", "status", "reason"),
    [
        ({"image": "***"}, 400, "invalid_input"),
        ({"image": ""}, 400, "invalid_input"),
        ({"mime_type": "text/plain"}, 400, "invalid_input"),
        ({"options": "nope"}, 400, "invalid_input"),
        ({"unexpected": 1}, 400, "invalid_input"),
        ({"plugin": "does_not_exist"}, 404, "unknown_plugin"),
        ({"plugin": "raise_kaboom"}, 400, "plugin_raised"),
        ({"plugin": "return_none"}, 400, "invalid_output"),
        ({"plugin": "result_too_large"}, 400, "output_too_large"),
        ({"plugin": "import_error"}, 400, "load_failed"),
        ({"plugin": "busy_loop"}, 400, "timeout"),
        ({"plugin": "huge_allocation"}, 400, "memory_limit"),
        ({"plugin": "segfault"}, 400, "crashed"),
        ({"plugin": "garbage_frame"}, 400, "protocol_violation"),
    ],
)
def test_analyze_errors_map_to_their_status(
    client: TestClient, body: dict, change: dict, status: int, reason: str
) -> None:
    assert_envelope(client.post("/v1/analyze", json={**body, **change}), status, reason)


def test_malformed_json_is_a_400_envelope(client: TestClient) -> None:
    response = client.post(
        "/v1/analyze", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_envelope(response, 400, "invalid_input")


def test_upload_route_takes_a_file(client: TestClient, png: bytes) -> None:
    response = client.post(
        "/v1/analyze/upload",
        files={"file": ("p.png", png, "image/png")},
        data={"plugin": "dominant_colors", "options": json.dumps({"count": 2})},
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["result"]["colors"]) == 2


def test_upload_with_bad_options_or_no_file_is_refused(client: TestClient, png: bytes) -> None:
    response = client.post(
        "/v1/analyze/upload", files={"file": ("p.png", png, "image/png")}, data={"options": "[1"}
    )
    assert_envelope(response, 400, "invalid_input")
    assert_envelope(
        client.post("/v1/analyze/upload", data={"plugin": "image_info"}), 400, "invalid_input"
    )
    response = client.post("/v1/analyze/upload", files={"file": ("p.txt", b"hello", "text/plain")})
    assert_envelope(response, 400, "invalid_input")


def test_request_body_over_the_limit_is_refused_before_it_is_read(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(max_request_bytes=4096)
    big = {**body, "image": "A" * 10_000}
    assert_envelope(client.post("/v1/analyze", json=big), 413, "payload_too_large")

    def chunks():
        for _ in range(10):
            yield b"A" * 1000

    response = client.post(
        "/v1/analyze", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_envelope(response, 413, "payload_too_large")


def wait_status(client: TestClient, job_id: str, wanted: set[str], timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in wanted:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {wanted}: {job}")


def test_job_lifecycle_create_get_list(client: TestClient, body: dict) -> None:
    response = client.post("/v1/jobs", json={**body, "plugin": "image_hash"})
    assert response.status_code == 202
    job_id = response.json()["job"]["id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    job = wait_status(client, job_id, {"SUCCESS"})
    assert job["result"]["sha256"] and job["error"] is None
    client.post("/v1/jobs", json={**body, "plugin": "raise_kaboom"})
    listing = client.get("/v1/jobs", params={"plugin": "image_hash"}).json()
    assert listing["total"] == 1 and listing["jobs"][0]["id"] == job_id
    page = client.get("/v1/jobs", params={"limit": 1, "offset": 0}).json()
    assert page["total"] == 2 and len(page["jobs"]) == 1 and page["limit"] == 1
    succeeded = client.get("/v1/jobs", params={"status": "SUCCESS"}).json()
    assert [j["id"] for j in succeeded["jobs"]] == [job_id]


@pytest.mark.parametrize(
    "params", [{"status": "BOGUS"}, {"limit": 0}, {"limit": 100000}, {"offset": -1}]
)
def test_job_list_rejects_bad_filters(client: TestClient, params: dict) -> None:
    assert_envelope(client.get("/v1/jobs", params=params), 400, "invalid_input")


def test_job_errors(client: TestClient, body: dict) -> None:
    assert_envelope(client.get("/v1/jobs/nope"), 404, "unknown_job")
    assert_envelope(client.delete("/v1/jobs/nope"), 404, "unknown_job")
    assert_envelope(client.post("/v1/jobs", json={**body, "plugin": "nope"}), 404, "unknown_plugin")
    job_id = client.post("/v1/jobs", json=body).json()["job"]["id"]
    wait_status(client, job_id, {"SUCCESS"})
    assert_envelope(client.delete(f"/v1/jobs/{job_id}"), 409, "job_finished")


def test_delete_cancels_a_running_job(client: TestClient, body: dict) -> None:
    job_id = client.post("/v1/jobs", json={**body, "plugin": "sleep_forever"}).json()["job"]["id"]
    wait_status(client, job_id, {"RUNNING"})
    response = client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 200
    assert response.json()["status"] == "CANCELLED"
    assert response.json()["error"]["details"]["reason"] == "cancelled"


def test_full_queue_gives_503_overloaded_with_retry_after(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(workers=1, queue_size=1)
    ids = [
        client.post("/v1/jobs", json={**body, "plugin": "sleep_forever"}).json()["job"]["id"]
        for _ in range(2)
    ]
    response = client.post("/v1/analyze", json=body)
    assert_envelope(response, 503, "overloaded")
    assert int(response.headers["retry-after"]) >= 1
    for job_id in ids:
        client.delete(f"/v1/jobs/{job_id}")


def test_crashing_plugin_is_quarantined_while_others_answer(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(admin_token="a-token")
    statuses = [
        client.post("/v1/analyze", json={**body, "plugin": "segfault"}).status_code
        for _ in range(3)
    ]
    assert statuses == [400, 400, 400]
    response = client.post("/v1/analyze", json={**body, "plugin": "segfault"})
    detail = assert_envelope(response, 503, "quarantined")
    assert int(response.headers["retry-after"]) >= 1 and detail["plugin"] == "segfault"
    assert client.post("/v1/analyze", json=body).status_code == 200
    described = client.get("/v1/plugins/segfault").json()
    assert described["quarantine"]["quarantined"] is True and described["state"] == "UNAVAILABLE"
    reset = client.post("/v1/admin/plugins/segfault/quarantine/reset", headers=ADMIN)
    assert reset.status_code == 200 and reset.json()["quarantine"]["quarantined"] is False
    assert_envelope(client.post("/v1/analyze", json={**body, "plugin": "segfault"}), 400, "crashed")


def test_plugins_routes(client: TestClient) -> None:
    listing = client.get("/v1/plugins").json()
    names = {p["name"] for p in listing["plugins"]}
    assert {"image_info", "image_hash", "dominant_colors"} <= names
    info = client.get("/v1/plugins/image_info").json()
    assert info["limits"] == {"timeout_s": 10, "memory_mb": 256}
    assert info["state"] in {"IDLE", "SUCCESS"} and "avg_execution_time_ms" in info["metrics"]
    assert_envelope(client.get("/v1/plugins/nope"), 404, "unknown_plugin")


def test_admin_reload_rediscovers_plugins(make_client: Callable[..., TestClient]) -> None:
    client = make_client(admin_token="a-token")
    response = client.post("/v1/admin/reload", headers=ADMIN)
    assert response.status_code == 200 and "image_info" in response.json()["plugins"]


def test_health_ready_and_metrics(client: TestClient, body: dict) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["isolation"]["fresh_process_per_call"] is True
    from sandbox.layers import detect

    assert ready["isolation"]["network_namespace"] is bool(detect().get("network_namespace"))
    client.post("/v1/analyze", json=body)
    client.post("/v1/analyze", json={**body, "plugin": "segfault"})
    text = client.get("/metrics").text
    assert 'plughost_plugin_calls_total{plugin="image_info",outcome="success"} 1' in text
    assert 'plughost_plugin_calls_total{plugin="segfault",outcome="crashed"} 1' in text
    assert 'plughost_plugin_call_seconds_count{plugin="image_info"} 1' in text
    assert "plughost_queue_depth 0" in text and "plughost_sandboxes_running 0" in text


def test_unknown_route_and_method_are_envelopes(client: TestClient) -> None:
    assert_envelope(client.get("/v1/nothing"), 404, "not_found")
    assert_envelope(client.put("/v1/analyze"), 405, "method_not_allowed")


def test_host_bug_is_a_500_without_traceback(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from host.services import PluginManagementService

    def broken(self: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(PluginManagementService, "list_plugins", broken)
    response = client.get("/v1/plugins")
    assert_envelope(response, 500, "internal")
    assert "secret internals" not in response.text


def test_tokens_guard_client_and_admin_routes(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(client_tokens=["c-token"], admin_token="a-token")
    assert_envelope(client.post("/v1/analyze", json=body), 401, "unauthorized")
    wrong = {"Authorization": "Bearer nope"}
    assert_envelope(client.get("/v1/plugins", headers=wrong), 401, "unauthorized")
    ok = {"Authorization": "Bearer c-token"}
    assert client.post("/v1/analyze", json=body, headers=ok).status_code == 200
    assert_envelope(client.post("/v1/admin/reload", headers=ok), 401, "unauthorized")
    admin = {"Authorization": "Bearer a-token"}
    assert client.post("/v1/admin/reload", headers=admin).status_code == 200
    assert client.get("/healthz").status_code == 200  # probes stay open


def test_admin_routes_are_off_when_only_client_tokens_are_set(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(client_tokens=["c"])
    assert_envelope(
        client.post("/v1/admin/reload", headers={"Authorization": "Bearer c"}), 403, "forbidden"
    )


def test_openapi_describes_every_route_and_error(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in [
        "/v1/analyze",
        "/v1/analyze/upload",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/plugins",
        "/v1/plugins/{name}",
        "/healthz",
        "/readyz",
        "/metrics",
    ]:
        assert path in paths
    assert "503" in paths["/v1/analyze"]["post"]["responses"]
    assert "ErrorBody" in schema["components"]["schemas"]


def test_analyze_that_outlasts_its_wait_answers_202_with_a_job_to_follow(
    client: TestClient, body: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import host.api.routes.analyze as analyze

    # The analysis goes on after the answer: stored then, it is followed at its link.
    monkeypatch.setattr(analyze, "ANALYZE_WAIT_S", 0.2)
    response = client.post("/v1/analyze", json={**body, "plugin": "sleep_forever"})
    assert response.status_code == 202
    job = response.json()["job"]
    assert job["status"] in ("PENDING", "RUNNING")
    link = response.json()["links"]["self"]
    assert client.get(link).json()["status"] in ("PENDING", "RUNNING")
    finished = wait_status(client, job["id"], {"FAILED"})
    assert finished["error"]["details"]["reason"] == "timeout"


def test_every_admin_route_refuses_a_client_token_and_none(
    make_client: Callable[..., TestClient],
) -> None:
    """The admin router carries the check: each of its routes, whatever it
    is, refuses a request without a token and one with a client's (401)."""
    from fastapi.routing import APIRoute

    from host.api.routes import admin

    client = make_client(admin_token="a-token", client_tokens=["c-token"])
    routes = [r for r in admin.router.routes if isinstance(r, APIRoute)]
    assert len(routes) >= 2
    for route in routes:
        path = route.path.replace("{name}", "image_info")
        for method in route.methods:
            assert client.request(method, path).status_code == 401, path
            as_client = client.request(method, path, headers={"Authorization": "Bearer c-token"})
            assert as_client.status_code == 401, path
            assert client.request(method, path, headers=ADMIN).status_code == 200, path
