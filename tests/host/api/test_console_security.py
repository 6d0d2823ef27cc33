"""The console attacked from outside: one client reading another's inputs,
host details shown to clients, and the sign-in (token in the cookie, replay
after sign-out, cross-site sign-in, guessing tokens)."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from host.console.session import COOKIE
from host.environments import EnvState, EnvStatus
from host.registry import PluginRegistry

ORIGIN = {"Origin": "http://testserver"}  # the TestClient's own origin
SECRET = "zz-SECRET-OF-CLIENT-A"  # an option value image_hash's schema rejects, quoting it


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "the page carries no CSRF field"
    return found.group(1)


def sign_in(client: TestClient, token: str, headers: dict[str, str] | None = None) -> Any:
    """Sign in as a browser does: the form, then its post (with the form's
    CSRF field, if it has one) from the console's own origin unless `headers` say else."""
    form = client.get("/console/login").text
    field = re.search(r'name="csrf" value="([0-9a-f]+)"', form)
    data = {"token": token, **({"csrf": field.group(1)} if field else {})}
    return client.post(
        "/console/login",
        data=data,
        headers=ORIGIN if headers is None else headers,
        follow_redirects=False,
    )


def _call_with_secret(client: TestClient, body: dict, token: str) -> None:
    options = {"compare_to": SECRET}
    answer = client.post(
        "/v1/analyze",
        json={**body, "plugin": "image_hash", "options": options},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert answer.status_code == 400 and SECRET in answer.json()["detail"]["message"]


# -- what a client sees is its own ------------------------------------------


def test_client_b_does_not_see_client_as_error_message_on_the_plugin_page(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(client_tokens=["token-a", "token-b"], admin_token="a-token")
    _call_with_secret(client, body, "token-a")
    own = {"Authorization": "Bearer token-b"}
    assert client.post("/v1/analyze", json={**body, "plugin": "image_hash"}, headers=own).is_success
    sign_in(client, "token-b")
    page = client.get("/console/plugins/image_hash")
    assert page.status_code == 200 and "signed in as <strong>client-" in page.text
    assert SECRET not in page.text
    assert "invalid_input" not in page.text  # not even that A's call failed
    assert "outcome-ok" in page.text  # B's own call is there
    sign_in(client, "token-a")
    assert SECRET in client.get("/console/plugins/image_hash").text  # A sees its own


def test_a_client_is_shown_the_figures_of_its_own_calls_alone(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    """How often another client calls a plugin, when it last did and how
    long its calls took are that client's: a client's `metrics` (API) and
    figures (console) count its own calls; the admin's every call."""
    client = make_client(client_tokens=["token-a", "token-b"], admin_token="a-token")
    for _ in range(3):
        answer = client.post(
            "/v1/analyze", json={**body, "plugin": "image_info"}, headers=_bearer("token-a")
        )
        assert answer.is_success
    answer = client.post(
        "/v1/analyze", json={**body, "plugin": "image_info"}, headers=_bearer("token-b")
    )
    assert answer.is_success

    def metrics(token: str) -> dict[str, Any]:
        found = client.get("/v1/plugins/image_info", headers=_bearer(token)).json()["metrics"]
        listed = client.get("/v1/plugins", headers=_bearer(token)).json()["plugins"]
        assert [p["metrics"] for p in listed if p["name"] == "image_info"] == [found]
        return dict(found)

    mine, theirs, everyone = metrics("token-b"), metrics("token-a"), metrics("a-token")
    assert (mine["success_count"], theirs["success_count"], everyone["success_count"]) == (1, 3, 4)
    assert mine["error_count"] == theirs["error_count"] == 0
    assert mine["last_used"] is not None and mine["avg_execution_time_ms"] > 0
    never = client.get("/v1/plugins/image_hash", headers=_bearer("token-b")).json()["metrics"]
    assert never["success_count"] == 0 and never["last_used"] is None
    sign_in(client, "token-b")
    page = client.get("/console/plugins/image_info").text
    assert '<span class="kv">success: 1</span>' in page
    sign_in(client, "a-token")
    page = client.get("/console/plugins/image_info").text
    assert '<span class="kv">success: 4</span>' in page


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_admin_sees_every_clients_error_message_on_the_plugin_page(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(client_tokens=["token-a", "token-b"], admin_token="a-token")
    _call_with_secret(client, body, "token-a")
    sign_in(client, "a-token")
    page = client.get("/console/plugins/image_hash").text
    assert SECRET in page and 'data-testid="owner">by client-' in page


def test_clients_see_no_load_errors_installer_output_or_node_hosts(
    make_client: Callable[..., TestClient],
    registry: PluginRegistry,
    body: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from host.api.app import Services

    installer = "pip: /srv/operator/envs/3f2a could not fetch https://index.internal/simple"
    original = PluginRegistry.environment

    def environment(self: PluginRegistry, name: str) -> EnvState:
        if name == "image_hash":
            return EnvState(EnvStatus.FAILED, message=installer, packages=["numpy"])
        return original(self, name)

    monkeypatch.setattr(PluginRegistry, "environment", environment)
    monkeypatch.setattr(
        Services, "nodes", lambda self: [{"name": "n1", "state": "healthy", "host": "db-7.lan"}]
    )
    registry.load_errors.append("/srv/operator/plugins/broken/plugin.toml: entrypoint: missing")
    client = make_client(client_tokens=["token-a"], admin_token="a-token")
    failed = client.post(
        "/v1/analyze",
        json={**body, "plugin": "image_hash"},
        headers={"Authorization": "Bearer token-a"},
    )
    assert failed.json()["detail"]["details"]["reason"] == "environment_failed"
    sign_in(client, "token-a")
    overview = client.get("/console").text
    assert "/srv/operator" not in overview and "db-7.lan" not in overview
    assert "1 plugin could not be loaded" in overview
    page = client.get("/console/plugins/image_hash").text
    assert "/srv/operator" not in page and "index.internal" not in page
    assert "environment_failed" in page and ">failed<" in page  # unavailable, and why
    sign_in(client, "a-token")
    assert "/srv/operator/plugins/broken" in client.get("/console").text
    assert "db-7.lan" in client.get("/console").text
    assert "index.internal" in client.get("/console/plugins/image_hash").text


# -- sessions -----------------------------------------------------------------


@pytest.mark.parametrize("token", ["client-token-123", "admin-token-456"])
def test_the_session_cookie_does_not_contain_the_token(
    make_client: Callable[..., TestClient], token: str
) -> None:
    client = make_client(client_tokens=["client-token-123"], admin_token="admin-token-456")
    login = sign_in(client, token)
    assert login.status_code == 303
    set_cookies = login.headers.get_list("set-cookie")
    assert any(c.startswith(COOKIE + "=") for c in set_cookies)
    assert not any(token in c for c in set_cookies)
    assert not any(token in value for value in client.cookies.values())
    encoded = base64.b64encode(token.encode()).decode().rstrip("=")
    assert not any(encoded in value for value in client.cookies.values())
    assert client.get("/console").status_code == 200


def test_a_session_cookie_replayed_after_logout_is_refused(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(client_tokens=["c-token"], admin_token="a-token")
    sign_in(client, "a-token")
    stolen = client.cookies.get(COOKIE, path="/console")
    assert stolen and client.get("/console/confirm/reload").status_code == 200
    page = client.get("/console").text
    out = client.post("/console/logout", data={"csrf": _csrf(page)}, follow_redirects=False)
    assert out.status_code == 303
    client.cookies.set(COOKIE, stolen, domain="testserver.local", path="/console")
    assert client.cookies.get(COOKIE, path="/console") == stolen  # the old cookie, replayed
    answer = client.get("/console", follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/console/login"
    assert client.get("/console/confirm/reload").status_code == 403


def test_a_session_ends_when_its_token_is_no_longer_configured(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(client_tokens=["c-token", "other"])
    sign_in(client, "c-token")
    assert client.get("/console", follow_redirects=False).status_code == 200
    settings = client.app.state.settings  # type: ignore[attr-defined]
    settings.client_tokens.remove("c-token")
    assert client.get("/console", follow_redirects=False).status_code == 303


# -- cross-site sign-in -----------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://attacker.example"},
        {"Origin": "null"},
        {"Referer": "https://attacker.example/page"},
    ],
)
def test_a_cross_site_sign_in_is_refused_and_signs_nobody_in(
    make_client: Callable[..., TestClient], headers: dict[str, str]
) -> None:
    client = make_client(client_tokens=["attacker-token"])
    answer = sign_in(client, "attacker-token", headers)  # even with the form's CSRF field
    assert answer.status_code == 403
    assert COOKIE not in client.cookies
    assert client.get("/console", follow_redirects=False).status_code == 303


def test_a_sign_in_without_the_forms_csrf_token_is_refused_and_signs_nobody_in(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(client_tokens=["attacker-token"])
    bare = client.post(
        "/console/login", data={"token": "attacker-token"}, headers=ORIGIN, follow_redirects=False
    )
    assert bare.status_code == 403
    other = make_client(client_tokens=["attacker-token"])  # a field from another browser
    field = _csrf(other.get("/console/login").text)
    stolen = client.post(
        "/console/login",
        data={"token": "attacker-token", "csrf": field},
        headers=ORIGIN,
        follow_redirects=False,
    )
    assert stolen.status_code == 403
    client.get("/console/login")  # this browser's own pre-session cookie, a forged field
    forged = client.post(
        "/console/login",
        data={"token": "attacker-token", "csrf": "0" * 64},
        headers=ORIGIN,
        follow_redirects=False,
    )
    assert forged.status_code == 403
    assert COOKIE not in client.cookies
    assert client.get("/console", follow_redirects=False).status_code == 303


def test_an_admin_action_posted_from_another_site_is_refused(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(admin_token="a-token")
    sign_in(client, "a-token")
    confirm = client.get("/console/confirm/reload")
    forged = client.post(
        "/console/reload",
        data={"csrf": _csrf(confirm.text)},
        headers={"Origin": "https://attacker.example"},
    )
    assert forged.status_code == 403


# -- guessing tokens --------------------------------------------------------


def test_the_sixth_wrong_token_in_a_minute_from_one_address_gets_429_with_retry_after(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(client_tokens=["right-token"])
    for _ in range(5):
        assert sign_in(client, "wrong-guess").status_code == 401
    sixth = sign_in(client, "wrong-guess")
    assert sixth.status_code == 429
    assert 1 <= int(sixth.headers["retry-after"]) <= 60
    right = sign_in(client, "right-token")  # a right guess now tells nothing either
    assert right.status_code == 429 and COOKIE not in client.cookies
    assert "wrong-guess" not in caplog.text and "unknown token" in caplog.text


def test_a_throttled_address_may_sign_in_again_when_its_window_ends(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(
        client_tokens=["right-token"], console_login_failures=2, console_login_window_s=0.5
    )
    for _ in range(2):
        assert sign_in(client, "wrong").status_code == 401
    assert sign_in(client, "right-token").status_code == 429
    time.sleep(0.6)
    assert sign_in(client, "right-token").status_code == 303


def test_a_right_token_does_not_reset_an_addresss_count_of_wrong_ones(
    make_client: Callable[..., TestClient],
) -> None:
    # Else a client could interleave its own token with guesses of the admin's.
    client = make_client(client_tokens=["own-token"], console_login_failures=2)
    assert sign_in(client, "guess-1").status_code == 401
    assert sign_in(client, "own-token").status_code == 303
    assert sign_in(client, "guess-2").status_code == 401
    assert sign_in(client, "guess-3").status_code == 429
