"""Property-based fuzzing of the API: no input, however malformed, gets a 5xx."""

from __future__ import annotations

import base64
from collections.abc import Callable
from urllib.parse import quote

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_png

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
PNG = base64.b64encode(make_png(8, 8)).decode()
BODY = st.fixed_dictionaries(
    {},
    optional={
        "plugin": st.sampled_from(
            ["image_info", "image_hash", "dominant_colors", "nope", "", "../etc"]
        )
        | JSON,
        "image": st.sampled_from([PNG, "", "!!!", "AAAA"]) | st.text(max_size=40) | JSON,
        "mime_type": st.sampled_from(["image/png", "image/jpeg", "text/html", ""]) | JSON,
        "options": st.dictionaries(st.text(max_size=8), JSON, max_size=3) | JSON,
        "extra": JSON,
    },
)
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(body=BODY | JSON, route=st.sampled_from(["/v1/analyze", "/v1/jobs"]))
def test_json_routes_never_answer_5xx(
    make_client: Callable[..., TestClient], body: object, route: str
) -> None:
    client = _client(make_client)
    response = client.post(route, json=body)
    assert response.status_code < 500, response.text
    assert (
        response.status_code != 503
        or "overloaded" in response.text
        or "quarantined" in response.text
    )


@FUZZ
@given(
    raw=st.binary(max_size=200),
    content_type=st.sampled_from(
        ["application/json", "text/plain", "multipart/form-data; boundary=x", ""]
    ),
)
def test_raw_bodies_never_answer_5xx(
    make_client: Callable[..., TestClient], raw: bytes, content_type: str
) -> None:
    client = _client(make_client)
    for route in ("/v1/analyze", "/v1/jobs", "/v1/analyze/upload"):
        response = client.post(route, content=raw, headers={"content-type": content_type})
        assert response.status_code < 500, (route, response.text)


@FUZZ
@given(
    job_id=st.text(min_size=1, max_size=40).filter(
        lambda s: "/" not in s and "?" not in s and "#" not in s
    ),
    params=st.dictionaries(
        st.sampled_from(["status", "plugin", "limit", "offset", "x"]),
        st.text(max_size=12),
        max_size=4,
    ),
    name=st.text(min_size=1, max_size=30).filter(
        lambda s: "/" not in s and "?" not in s and "#" not in s
    ),
)
def test_read_routes_never_answer_5xx(
    make_client: Callable[..., TestClient], job_id: str, params: dict, name: str
) -> None:
    client = _client(make_client)
    job_id, name = quote(job_id, safe=""), quote(name, safe="")
    for response in (
        client.get(f"/v1/jobs/{job_id}"),
        client.delete(f"/v1/jobs/{job_id}"),
        client.get("/v1/jobs", params=params),
        client.get(f"/v1/plugins/{name}"),
    ):
        assert response.status_code < 500, response.text


_clients: dict[int, TestClient] = {}


def _client(make_client: Callable[..., TestClient]) -> TestClient:
    # One app per test function (hypothesis calls the body many times).
    key = id(make_client)
    if key not in _clients:
        _clients.clear()
        _clients[key] = make_client(workers=2, queue_size=64)
    return _clients[key]
