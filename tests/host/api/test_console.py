"""The console's pages as a client sees them over HTTP (no browser): what each
page shows, who may see what, the cookie, CSRF and the admin actions."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from host.console.session import COOKIE
from host.registry import PluginRegistry

ADMIN = {"Authorization": "Bearer a-token"}
ROOT = Path(__file__).resolve().parents[3]


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "the page carries no CSRF field"
    return found.group(1)


def sign_in(client: TestClient, token: str) -> Any:
    """Sign in as a browser does: the form (its CSRF field and pre-session
    cookie), then the post from the console's own origin."""
    form = client.get("/console/login")
    return client.post(
        "/console/login",
        data={"token": token, "csrf": _csrf(form.text)},
        headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )


def test_overview_lists_plugins_with_figures_from_the_metrics(
    client: TestClient, body: dict
) -> None:
    client.post("/v1/analyze", json=body)
    client.post("/v1/analyze", json={**body, "plugin": "segfault"})
    page = client.get("/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    row = re.search(r'<tr id="plugin-image_info".*?</tr>', page.text, re.S)
    assert row and 'data-testid="calls">1<' in row.group(0) and "SUCCESS" in row.group(0)
    crashed = re.search(r'<tr id="plugin-segfault".*?</tr>', page.text, re.S)
    assert crashed and "UNAVAILABLE" in crashed.group(0) and "(100.0%)" in crashed.group(0)
    assert "<svg" in row.group(0) and "of 256 MB" in row.group(0)
    assert "Content-Security-Policy" in page.headers and "cdn" not in page.text.lower()
    assert "Nodes" not in page.text  # a single node has none to show


def test_plugin_page_shows_recent_outcomes_without_internal(client: TestClient, body: dict) -> None:
    client.post("/v1/analyze", json={**body, "plugin": "raise_kaboom"})
    page = client.get("/console/plugins/raise_kaboom")
    assert page.status_code == 200
    assert "plugin_raised" in page.text and "kaboom" in page.text
    assert "_internal" not in page.text and "Traceback" not in page.text
    assert client.get("/console/plugins/nope").status_code == 404


def test_metrics_export_peak_memory_and_limits(client: TestClient, body: dict) -> None:
    client.post("/v1/analyze", json=body)
    text = client.get("/metrics").text
    assert 'plughost_plugin_peak_memory_bytes_count{plugin="image_info"} 1' in text
    assert 'plughost_plugin_memory_limit_bytes{plugin="image_info"} 268435456' in text
    assert 'plughost_plugin_timeout_seconds{plugin="image_info"} 10' in text
    assert 'plughost_plugin_quarantined{plugin="image_info"} 0.0' in text


def test_isolation_page_names_every_layer(client: TestClient) -> None:
    ready = client.get("/readyz").json()
    page = client.get("/console/isolation").text
    for layer in ready["isolation"]:
        assert f"<code>{layer}</code>" in page
    assert "did not run" in page  # the test clients turn the self-check off


def test_static_assets_ship_in_the_package(client: TestClient) -> None:
    for name, kind in [("console.css", "text/css"), ("console.js", "text/javascript")]:
        response = client.get(f"/console/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
    assert client.get("/console/static/..%2Fviews.py").status_code == 404
    assert client.get("/console/static/nothing.css").status_code == 404


def test_open_mode_shows_pages_and_no_admin_actions(client: TestClient) -> None:
    assert client.get("/console").status_code == 200
    assert "Reload plugins" not in client.get("/console").text
    assert client.get("/console/confirm/reload").status_code == 403
    assert client.post("/console/reload", data={"csrf": "x"}).status_code == 403


def test_client_tokens_require_login_and_the_cookie_is_strict(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(client_tokens=["c-token"], admin_token="a-token")
    first = client.get("/console", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/console/login"
    assert sign_in(client, "wrong").status_code == 401
    login = sign_in(client, "c-token")
    assert login.status_code == 303
    cookie = next(c for c in login.headers.get_list("set-cookie") if c.startswith(COOKIE + "="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    page = client.get("/console")
    assert page.status_code == 200 and "signed in as <strong>client-" in page.text
    assert "Reload plugins" not in page.text
    assert client.get("/console/confirm/reload").status_code == 403


def test_client_sees_only_its_own_jobs_and_admin_sees_all(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(client_tokens=["c1", "c2"], admin_token="a-token")
    mine = client.post("/v1/analyze", json=body, headers={"Authorization": "Bearer c1"}).json()
    theirs = client.post("/v1/analyze", json=body, headers={"Authorization": "Bearer c2"}).json()
    sign_in(client, "c1")
    page = client.get("/console/jobs").text
    assert mine["job_id"] in page and theirs["job_id"] not in page
    sign_in(client, "a-token")
    page = client.get("/console/jobs?status=SUCCESS&plugin=image_info").text
    assert mine["job_id"] in page and theirs["job_id"] in page
    assert "image_info" in client.get("/console/jobs?status=FAILED").text  # the filter menu
    assert mine["job_id"] not in client.get("/console/jobs?status=FAILED").text


def test_admin_resets_a_quarantine_with_confirmation_and_csrf(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(admin_token="a-token")
    client.app.state.services.plugins.quarantine.threshold = 1  # type: ignore[attr-defined]
    client.post("/v1/analyze", json={**body, "plugin": "segfault"})
    assert client.get("/v1/plugins/segfault").json()["quarantine"]["quarantined"]
    sign_in(client, "a-token")
    page = client.get("/console/plugins/segfault").text
    assert "Lift quarantine" in page
    confirm = client.get("/console/confirm/reset?name=segfault")
    assert confirm.status_code == 200 and "Lift the quarantine of plugin segfault" in confirm.text
    forged = client.post("/console/plugins/segfault/quarantine/reset", data={"csrf": "0" * 64})
    assert forged.status_code == 403
    assert client.get("/v1/plugins/segfault").json()["quarantine"]["quarantined"]
    done = client.post(
        "/console/plugins/segfault/quarantine/reset", data={"csrf": _csrf(confirm.text)}
    )
    assert done.status_code == 200 and "not quarantined" in done.text
    assert "The quarantine was lifted." in done.text
    assert not client.get("/v1/plugins/segfault", headers=ADMIN).json()["quarantine"]["quarantined"]


def test_logout_needs_csrf_and_clears_the_cookie(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(client_tokens=["c-token"])
    sign_in(client, "c-token")
    page = client.get("/console").text
    assert client.post("/console/logout", data={"csrf": "nope"}).status_code == 403
    out = client.post("/console/logout", data={"csrf": _csrf(page)}, follow_redirects=False)
    assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["set-cookie"]


def test_a_bearer_header_works_for_scripts(make_client: Callable[..., TestClient]) -> None:
    client = make_client(client_tokens=["c-token"])
    assert client.get("/console", headers={"Authorization": "Bearer c-token"}).status_code == 200


def test_page_values_are_escaped(client: TestClient, body: dict) -> None:
    client.post("/v1/analyze", json={**body, "plugin": "raise_kaboom"})
    page = client.get("/console/jobs?plugin=%3Cscript%3E").text
    assert "<script>" not in page.replace('<script src="/console/static/console.js"', "")


def _queries(node: object) -> list[str]:
    """Every PromQL expression in a Grafana dashboard: panel targets and variable queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            else:
                found += _queries(value)
    elif isinstance(node, list):
        for item in node:
            found += _queries(item)
    return found


def test_grafana_dashboard_queries_only_metrics_the_host_exports(
    client: TestClient, body: dict
) -> None:
    dashboard = json.loads((ROOT / "docs/grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["panels"]
    queries = _queries(dashboard)
    assert len(queries) >= 10
    client.post("/v1/analyze", json=body)
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in client.get("/metrics").text.splitlines()
        if line and not line.startswith("#")
    }
    queried = {name for query in queries for name in re.findall(r"\bplughost_[a-z0-9_]+", query)}
    assert {"plughost_plugin_peak_memory_bytes_bucket", "plughost_queue_depth"} <= queried
    assert queried <= exported, sorted(queried - exported)


def test_admin_reload_from_the_console_is_confirmed_and_rediscovers(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(admin_token="a-token")
    sign_in(client, "a-token")
    assert "Reload plugins" in client.get("/console").text
    confirm = client.get("/console/confirm/reload")
    assert confirm.status_code == 200 and "Discover plugins again" in confirm.text
    assert client.post("/console/reload", data={}).status_code == 403  # no CSRF field
    done = client.post("/console/reload", data={"csrf": _csrf(confirm.text)})
    assert done.status_code == 200 and 'id="plugin-image_info"' in done.text


def test_nodes_section_shows_the_admin_only_when_the_services_report_nodes(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    from host.api.app import Services

    client = make_client(admin_token="a-token")
    sign_in(client, "a-token")
    assert "<h2>Nodes</h2>" not in client.get("/console").text
    node = {"name": "node-a", "state": "up", "last_seen": "2026-01-01T00:00:00+00:00", "jobs": 3}
    monkeypatch.setattr(Services, "nodes", lambda self: [node])
    page = client.get("/console").text
    assert "<h2>Nodes</h2>" in page and "node-a" in page and "jobs: 3" in page


def test_plugin_output_is_escaped_on_the_plugin_page(
    registry: PluginRegistry, make_client: Callable[..., TestClient], body: dict, tmp_path: Path
) -> None:
    from host.discovery import discover
    from tests.conftest import write_plugin

    write_plugin(tmp_path, "shouty", "raise RuntimeError('<script>alert(1)</script>')")
    discover(registry, [tmp_path])
    client = make_client()
    client.post("/v1/analyze", json={**body, "plugin": "shouty"})
    page = client.get("/console/plugins/shouty").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page


def test_confirmation_of_an_unknown_plugin_is_a_404(make_client: Callable[..., TestClient]) -> None:
    client = make_client(admin_token="a-token")
    sign_in(client, "a-token")
    assert client.get("/console/confirm/reset?name=..%2Freload").status_code == 404
    assert client.get("/console/confirm/explode").status_code == 404
