"""Bounded requests and servable results: a body is checked against its caps
before it is expanded, and whatever a plugin returns, the API answers with
an envelope, never a 500."""

from __future__ import annotations

import base64
import gc
import json
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from host.api.errors import ErrorBody, error_response
from host.errors import envelope
from tests.host.api.test_routes import assert_envelope, wait_status

JSON = {"content-type": "application/json"}


def raw_body(png: bytes, options: bytes) -> bytes:
    image = base64.b64encode(png)
    return b'{"image": "' + image + b'", "mime_type": "image/png", "options": ' + options + b"}"


def nested(levels: int) -> bytes:
    return b'{"a": ' * (levels - 1) + b"{}" + b"}" * (levels - 1)


def peak_bytes(call: Callable[[], Any]) -> tuple[Any, int]:
    """What `call` returns and the most Python memory it held at once."""
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        value = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return value, peak - base


def test_red_team_options_flood_is_refused_before_it_is_expanded(
    client: TestClient, png: bytes
) -> None:
    # The red team's 9.5 MB body: it grew the host by about 57 times its size.
    data = raw_body(png, b'{"x": [' + b"{}," * 3_160_000 + b"{}]}")
    response, peak = peak_bytes(lambda: client.post("/v1/analyze", content=data, headers=JSON))
    detail = assert_envelope(response, 400, "invalid_input")
    assert detail["message"] == "field 'options' has more than 10000 items"
    assert peak < 3 * len(data), f"peak {peak / 1e6:.0f} MB for a {len(data) / 1e6:.1f} MB body"


def test_large_image_costs_a_small_multiple_of_the_body(client: TestClient) -> None:
    image = b"\x89PNG\r\n\x1a\n" + bytes(7_000_000)  # not a real PNG: the plugin refuses it
    text = json.dumps({"image": base64.b64encode(image).decode(), "mime_type": "image/png"})
    data = text.encode()
    response, peak = peak_bytes(lambda: client.post("/v1/analyze", content=data, headers=JSON))
    assert_envelope(response, 400, "plugin_raised")
    # The body buffer plus the decoded image; the text is never decoded to a str.
    assert peak < 2.5 * len(data), f"peak {peak / 1e6:.0f} MB for a {len(data) / 1e6:.1f} MB body"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (nested(17), "field 'options' nests deeper than 16 levels"),
        (nested(5000), "field 'options' nests deeper than 16 levels"),
        (b'{"s": "' + b"x" * 70_000 + b'"}', "field 'options' has a string longer than 65536"),
        (b'{"s": "\\ud800"}', "field 'options' holds a lone surrogate"),
        (b'"nope"', "field 'options' must be an object"),
    ],
)
def test_options_beyond_their_caps_are_refused_naming_the_cap(
    client: TestClient, png: bytes, options: bytes, message: str
) -> None:
    for route in ("/v1/analyze", "/v1/jobs"):
        response = client.post(route, content=raw_body(png, options), headers=JSON)
        assert message in assert_envelope(response, 400, "invalid_input")["message"]


def test_options_at_their_caps_are_accepted(client: TestClient, png: bytes) -> None:
    response = client.post("/v1/analyze", content=raw_body(png, nested(16)), headers=JSON)
    assert response.status_code == 200, response.text


def test_option_caps_are_settings(make_client: Callable[..., TestClient], png: bytes) -> None:
    client = make_client(options_max_depth=2, options_max_items=3)
    response = client.post("/v1/analyze", content=raw_body(png, nested(3)), headers=JSON)
    assert (
        "nests deeper than 2 levels" in assert_envelope(response, 400, "invalid_input")["message"]
    )
    response = client.post(
        "/v1/analyze", content=raw_body(png, b"{" + b'"a": 1,' * 4 + b'"b": 2}'), headers=JSON
    )
    assert "more than 3 items" in assert_envelope(response, 400, "invalid_input")["message"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"image": "QUJD", "mime_type": "image/png", "extra": 1}', "unknown fields: 'extra'"),
        (b'{"mime_type": "image/png"}', "field 'image' is missing"),
        (b'{"image": "QUJD"}', "field 'mime_type' is missing"),
        (b'{"image": "QUJD", "mime_type": 5}', "field 'mime_type' must be a string"),
        (b'{"image": 5, "mime_type": "image/png"}', "field 'image' must be a base64 string"),
        (b'{"image": "QUJD", "mime_type": "image/png", "plugin": []}', "'plugin' must be a string"),
        (b'{"image": "QUJ", "mime_type": "image/png"}', "field 'image' is not valid base64"),
        (b'[{"image": "QUJD"}]', "not a valid JSON object"),
        (b"", "not a valid JSON object"),
    ],
)
def test_malformed_bodies_are_refused_naming_the_field(
    client: TestClient, data: bytes, message: str
) -> None:
    response = client.post("/v1/analyze", content=data, headers=JSON)
    assert message in assert_envelope(response, 400, "invalid_input")["message"]


def test_image_with_escaped_slashes_or_sent_in_chunks_is_decoded(
    client: TestClient, png: bytes
) -> None:
    text = base64.b64encode(png + b"\xff\xff\xff").decode()  # a tail that encodes to "/"
    data = json.dumps({"image": text, "mime_type": "image/png"}).replace("/", "\\/").encode()
    assert b"\\/" in data
    response = client.post("/v1/analyze", content=data, headers=JSON)
    assert response.status_code == 200 and response.json()["result"]["format"] == "PNG"

    def chunks() -> Iterator[bytes]:  # no Content-Length: read as it comes
        yield from (data[i : i + 1000] for i in range(0, len(data), 1000))

    response = client.post("/v1/analyze", content=chunks(), headers=JSON)
    assert response.status_code == 200 and response.json()["result"]["format"] == "PNG"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("[" * 5000 + "]" * 5000, "form field 'options' nests deeper than 16 levels"),
        ('{"x": [' + "{}," * 20_000 + "{}]}", "form field 'options' has more than 10000 items"),
        ('{"s": "\\udc00"}', "form field 'options' holds a lone surrogate"),
        ("[1", "form field 'options' is not a JSON object"),
    ],
)
def test_multipart_options_get_the_same_caps(
    client: TestClient, png: bytes, options: str, message: str
) -> None:
    response = client.post(
        "/v1/analyze/upload", files={"file": ("p.png", png, "image/png")}, data={"options": options}
    )
    assert message in assert_envelope(response, 400, "invalid_input")["message"]


@pytest.mark.parametrize(
    ("plugin", "error"),
    [
        ("lone_surrogate_result", "ValidationError:invalid_output"),
        ("deep_result_255", "ValidationError:invalid_output"),
        ("lone_surrogate_message", "ExecutionError:plugin_raised"),
    ],
)
def test_results_the_api_cannot_serve_are_a_400_and_job_routes_keep_answering(
    client: TestClient, body: dict, plugin: str, error: str
) -> None:
    kind, reason = error.split(":")
    detail = assert_envelope(
        client.post("/v1/analyze", json={**body, "plugin": plugin}), 400, reason
    )
    assert detail["type"] == kind
    response = client.post("/v1/jobs", json={**body, "plugin": plugin})
    assert response.status_code == 202
    job = wait_status(client, response.json()["job"]["id"], {"FAILED"})
    assert job["error"]["details"]["reason"] == reason and job["result"] is None
    listing = client.get("/v1/jobs")
    assert listing.status_code == 200 and job["id"] in [j["id"] for j in listing.json()["jobs"]]
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 200
    if plugin == "lone_surrogate_message":
        assert detail["message"] == "kaboom \ufffd"


def test_error_answer_renders_whatever_its_envelope_holds() -> None:
    error = envelope("invalid_input", "bad input", name="\ud800", ratio=float("nan"))["error"]
    response = error_response(error)
    assert response.status_code == 400
    detail = json.loads(response.body)["detail"]
    assert detail["details"]["name"] == "\ufffd" and detail["details"]["ratio"] is None


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("QUJ", "its length, 3 characters, is not a multiple of 4: the '=' padding is missing"),
        ("QQ", "the '=' padding is missing (add 2)"),
        ("QUJDR", "one more than a multiple of 4"),
        ("QQ=", "it ends in 1 '=' where 2 belong"),
        ("QU-D", "'-' at offset 2 is not a base64 character (URL-safe base64?"),
        ("QU=D", "'=' at offset 2 is not a base64 character ('=' pads the end only)"),
        ("QUJD\nQUJD", "'\\n' at offset 4 is not a base64 character"),
        ("QUJD\\/", "'\\\\' at offset 4 is not a base64 character"),
    ],
)
def test_bad_base64_is_refused_saying_what_is_wrong_with_it(
    client: TestClient, image: str, message: str
) -> None:
    for route in ("/v1/analyze", "/v1/jobs"):
        response = client.post(route, json={"image": image, "mime_type": "image/png"})
        detail = assert_envelope(response, 400, "invalid_input")
        assert detail["message"].startswith("field 'image' is not valid base64: "), detail
        assert message in detail["message"], detail


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "text/plain; charset=utf-8", "multipart/form-data"],
)
def test_a_body_not_declared_as_json_is_told_to_send_json(
    client: TestClient, png: bytes, content_type: str
) -> None:
    data = json.dumps({"image": base64.b64encode(png).decode(), "mime_type": "image/png"})
    for route in ("/v1/analyze", "/v1/jobs"):
        response = client.post(route, content=data, headers={"content-type": content_type})
        message = assert_envelope(response, 400, "invalid_input")["message"]
        media = content_type.partition(";")[0]
        assert f"request body is sent as {media}, but this route reads JSON" in message
        assert "send Content-Type: application/json" in message
        assert ("/v1/analyze/upload" in message) == (route == "/v1/analyze")
    # A form, as `curl -d` or an HTML form sends it.
    response = client.post("/v1/analyze", data={"image": "QUJD", "mime_type": "image/png"})
    assert (
        "send Content-Type: application/json"
        in assert_envelope(response, 400, "invalid_input")["message"]
    )


@pytest.mark.parametrize(
    "content_type", [None, "application/json; charset=utf-8", "application/vnd.api+json"]
)
def test_json_bodies_are_read_whatever_json_type_they_declare(
    client: TestClient, png: bytes, content_type: str | None
) -> None:
    data = json.dumps({"image": base64.b64encode(png).decode(), "mime_type": "image/png"})
    headers = {} if content_type is None else {"content-type": content_type}
    response = client.post("/v1/analyze", content=data, headers=headers)
    assert response.status_code == 200, response.text


def test_the_413_answer_is_the_envelope_every_other_error_is(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(max_request_bytes=4096)
    other = client.post("/v1/analyze", json={**body, "image": "***"})
    too_large = client.post("/v1/analyze", json={**body, "image": "A" * 10_000})

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused as it streams
        yield from (b"A" * 1000 for _ in range(10))

    streamed = client.post("/v1/analyze", content=chunks(), headers=JSON)
    assert_envelope(other, 400, "invalid_input")
    for response in (too_large, streamed):
        detail = assert_envelope(response, 413, "payload_too_large")
        ErrorBody.model_validate(response.json())
        assert detail["details"]["limit_bytes"] == 4096 and "4096" in detail["message"]
        # Rendered as every other error: same media type, same JSON layout.
        assert response.headers["content-type"] == other.headers["content-type"]
        assert response.content == error_response(detail).body
        assert set(detail["details"]) <= {"reason", "limit_bytes", "declared_bytes"}
    assert too_large.json()["detail"]["details"]["declared_bytes"] > 4096
