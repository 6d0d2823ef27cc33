"""What a client is shown of an environment that failed and of a plugin
that did not load: a reason code and a fixed message, never the installer's
words, the plugin's files or a host path; the admin sees the full text."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from host.environments import EnvironmentStore
from host.registry import PluginRegistry

pytestmark = pytest.mark.timeout(120)

INSTALLER_WORDS = "ERROR: quoting /etc/shadow: root:hash-of-the-host"
CLIENT = {"Authorization": "Bearer client-token"}
ADMIN = {"Authorization": "Bearer admin-token"}

FAILING_INSTALLER = f"""#!/bin/sh
echo "{INSTALLER_WORDS}"
exit 1
"""


def _plugin(root: Path, name: str, dependencies: str = "[]", lock: str | None = None) -> None:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "plugin.toml").write_text(
        f'name = "{name}"\nversion = "1.0"\nentrypoint = "{name}:Plugin"\n'
        f"dependencies = {dependencies}\n"
    )
    (directory / f"{name}.py").write_text(
        "class Plugin:\n    def run(self, payload):\n        return {}\n"
    )
    if lock is not None:
        (directory / "requirements.lock").write_text(lock)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PluginRegistry:
    """Two plugins of an outside author: one whose packages fail to
    install, one whose lock tries to include a host file."""
    tool = tmp_path / "bin" / "uv"
    tool.parent.mkdir()
    tool.write_text(FAILING_INSTALLER)
    tool.chmod(0o755)
    monkeypatch.setattr("host.installer.find_uv", lambda: str(tool))
    plugins = tmp_path / "plugins"
    _plugin(plugins, "broken_env", '["six==1.17.0"]')
    _plugin(plugins, "includes_shadow", lock="-r /etc/shadow\n")
    found = PluginRegistry()
    found.environments = EnvironmentStore(tmp_path / "envs")
    found.load_directory(plugins)
    return found


def _failed(client: TestClient) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        described: dict[str, object] = client.get("/v1/plugins/broken_env", headers=ADMIN).json()
        environment = described["environment"]
        assert isinstance(environment, dict)
        if environment["status"] == "failed":
            return described
        time.sleep(0.05)
    raise AssertionError("the environment never failed")


def test_an_environment_failure_shows_clients_a_reason_and_the_admin_the_installers_words(
    make_client: Callable[..., TestClient], tmp_path: Path, png: bytes
) -> None:
    client = make_client(client_tokens=["client-token"], admin_token="admin-token")
    admin_view = _failed(client)["environment"]
    assert isinstance(admin_view, dict)
    assert INSTALLER_WORDS in admin_view["detail"]
    assert admin_view["reason"] == "environment_failed"

    seen = client.get("/v1/plugins/broken_env", headers=CLIENT)
    assert seen.status_code == 200
    environment = seen.json()["environment"]
    assert environment["status"] == "failed" and environment["reason"] == "environment_failed"
    assert "detail" not in environment
    listing = client.get("/v1/plugins", headers=CLIENT)
    for text in (seen.text, listing.text):
        assert "shadow" not in text and "hash-of-the-host" not in text
        assert str(tmp_path) not in text and "/envs" not in text

    body = {"plugin": "broken_env", "image": base64.b64encode(png).decode()}
    answer = client.post("/v1/analyze", json={**body, "mime_type": "image/png"}, headers=CLIENT)
    detail = answer.json()["detail"]
    assert answer.status_code == 424, answer.text
    assert "retry-after" not in answer.headers  # failed for good: no retry loop
    assert detail["details"]["reason"] == "environment_failed"
    assert detail["details"]["environment"] == "failed"
    assert "shadow" not in answer.text and str(tmp_path) not in answer.text


def test_load_errors_are_the_admins_alone(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = make_client(client_tokens=["client-token"], admin_token="admin-token")
    as_client = client.get("/v1/plugins", headers=CLIENT)
    assert as_client.status_code == 200
    assert as_client.json()["load_error_count"] == 1
    assert "load_errors" not in as_client.json()
    assert "shadow" not in as_client.text and str(tmp_path) not in as_client.text
    as_admin = client.get("/v1/plugins", headers=ADMIN).json()
    (error,) = as_admin["load_errors"]
    assert str(tmp_path / "plugins" / "includes_shadow" / "requirements.lock") in error
    assert "line 1:" in error and "'-r'" in error


def test_an_environment_being_prepared_is_worth_a_retry(
    make_client: Callable[..., TestClient], registry: PluginRegistry, png: bytes
) -> None:
    assert registry.environments is not None
    requirements = registry.get_plugin("broken_env").requirements
    key = registry.environments.key_for("broken_env", requirements)
    client = make_client(client_tokens=["client-token"], admin_token="admin-token")
    client.app.state.services.plugins.preparation.stop(10)
    registry.environments._preparing[key] = "broken_env"  # as while its installer runs
    body = {"plugin": "broken_env", "image": base64.b64encode(png).decode()}
    answer = client.post("/v1/analyze", json={**body, "mime_type": "image/png"}, headers=CLIENT)
    assert answer.status_code == 503, answer.text
    assert answer.json()["detail"]["details"]["reason"] == "environment_not_ready"
    assert answer.json()["detail"]["details"]["environment"] == "preparing"
    assert int(answer.headers["retry-after"]) >= 1
