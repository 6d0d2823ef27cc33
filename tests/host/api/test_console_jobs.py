"""A job's own page in the console, under the API's tenant rules, and the
clients' configured names: shown to the admin, never to another client."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from fastapi.testclient import TestClient

from host.api.auth import principal_id
from tests.host.api.test_console import sign_in

C1, C2 = {"Authorization": "Bearer c1"}, {"Authorization": "Bearer c2"}


def _job(client: TestClient, body: dict, headers: dict[str, str], plugin: str) -> str:
    """The id of a finished job of `plugin` queued with `headers`."""
    answer = client.post("/v1/jobs", json={**body, "plugin": plugin}, headers=headers)
    job_id: str = answer.json()["job"]["id"]
    deadline = time.monotonic() + 30
    while client.get(f"/v1/jobs/{job_id}", headers=headers).json()["finished_at"] is None:
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.02)
    return job_id


def test_a_job_has_a_page_linked_from_the_jobs_table(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(client_tokens=["c1", "c2"], admin_token="a-token")
    ok = _job(client, body, C1, "image_info")
    sign_in(client, "c1")
    assert f'href="/console/jobs/{ok}"' in client.get("/console/jobs").text
    page = client.get(f"/console/jobs/{ok}")
    assert page.status_code == 200
    assert re.search(r'data-testid="status"[^>]*>SUCCESS<', page.text)
    assert f"<code>{ok}</code>" in page.text and 'href="/console/plugins/image_info"' in page.text
    result = client.get(f"/v1/jobs/{ok}", headers=C1).json()["result"]
    assert (
        'data-testid="result"' in page.text and f"&#34;width&#34;: {result['width']}" in page.text
    )
    assert "Owner" not in page.text  # a client is shown its own jobs only
    assert client.get(f"/console/jobs/{ok}", follow_redirects=False).status_code == 200


def test_a_failed_jobs_page_shows_its_error_envelope(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(client_tokens=["c1"])
    failed = _job(client, body, C1, "raise_kaboom")
    sign_in(client, "c1")
    page = client.get(f"/console/jobs/{failed}").text
    assert 'data-testid="error">plugin_raised: kaboom<' in page
    assert "&#34;type&#34;: &#34;ExecutionError&#34;" in page and "_internal" not in page


def test_another_clients_job_is_a_404_like_an_unknown_one(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(client_tokens=["c1", "c2"], admin_token="a-token")
    theirs = _job(client, body, C1, "image_info")
    sign_in(client, "c2")
    other, unknown = client.get(f"/console/jobs/{theirs}"), client.get("/console/jobs/" + "0" * 32)
    assert other.status_code == unknown.status_code == 404
    assert "image_info" not in other.text and 'data-testid="result"' not in other.text
    assert other.text.replace(theirs, "X") == unknown.text.replace("0" * 32, "X")
    assert client.get("/console/jobs/" + "a" * 200).status_code == 404
    client.cookies.clear()
    anonymous = client.get(f"/console/jobs/{theirs}", follow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"] == "/console/login"


def test_the_admin_sees_clients_by_name_and_a_client_never_sees_anothers_name(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(client_tokens=["alice=c1", "c2"], admin_token="a-token")
    alices, plains = _job(client, body, C1, "image_info"), _job(client, body, C2, "image_info")
    # The stored owner stays the token's principal id: naming a token keeps its jobs.
    assert client.get(f"/v1/jobs/{alices}", headers=C1).json()["owner"] == principal_id("c1")
    sign_in(client, "a-token")
    table = client.get("/console/jobs").text
    rows = {
        m[0]: m[1]
        for m in re.findall(
            r'data-job="([0-9a-f]+)".*?data-testid="owner"[^>]*>([^<]*)<', table, re.S
        )
    }
    assert rows[alices] == "alice" and rows[plains] == principal_id("c2")
    assert "<strong>alice</strong>" in client.get(f"/console/jobs/{alices}").text
    recent = client.get("/console/plugins/image_info").text
    assert "by alice" in recent and f"by {principal_id('c2')}" in recent
    sign_in(client, "c1")
    assert "signed in as <strong>alice</strong>" in client.get("/console").text
    sign_in(client, "c2")
    for path in (
        "/console",
        "/console/jobs",
        "/console/plugins/image_info",
        f"/console/jobs/{plains}",
    ):
        assert "alice" not in client.get(path).text, path
