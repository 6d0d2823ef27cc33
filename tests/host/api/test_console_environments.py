"""A plugin whose environment keeps every call from running, as the console
shows it: never IDLE, its environment's status, reason and fixed message to
everyone, the installer's words to the admin alone."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from host.environments import EnvironmentStore
from host.registry import PluginRegistry
from tests.host.api.test_environment_visibility import (
    ADMIN,
    CLIENT,
    FAILING_INSTALLER,
    INSTALLER_WORDS,
    _failed,
    _plugin,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PluginRegistry:
    """A plugin whose packages fail to install and one that declares none."""
    tool = tmp_path / "bin" / "uv"
    tool.parent.mkdir()
    tool.write_text(FAILING_INSTALLER)
    tool.chmod(0o755)
    monkeypatch.setattr("host.installer.find_uv", lambda: str(tool))
    plugins = tmp_path / "plugins"
    _plugin(plugins, "broken_env", '["six==1.17.0"]')
    _plugin(plugins, "plain")
    found = PluginRegistry()
    found.environments = EnvironmentStore(tmp_path / "envs")
    found.load_directory(plugins)
    return found


def _row(page: str, plugin: str) -> str:
    found = re.search(rf'<tr id="plugin-{plugin}".*?</tr>', page, re.S)
    assert found, f"no row for {plugin}"
    return found.group(0)


def _state(html: str) -> str:
    found = re.search(r'data-testid="state"[^>]*>([^<]*)<', html)
    assert found
    return found.group(1)


def test_a_plugin_whose_environment_failed_cannot_run_and_says_why(
    make_client: Callable[..., TestClient], tmp_path: Path, png: bytes
) -> None:
    client = make_client(client_tokens=["client-token"], admin_token="admin-token")
    _failed(client)
    body = {
        "plugin": "broken_env",
        "image": base64.b64encode(png).decode(),
        "mime_type": "image/png",
    }
    assert client.post("/v1/analyze", json=body, headers=CLIENT).status_code == 424
    for headers, admin in ((CLIENT, False), (ADMIN, True)):
        overview = client.get("/console", headers=headers).text
        row, page = (
            _row(overview, "broken_env"),
            client.get("/console/plugins/broken_env", headers=headers).text,
        )
        assert _state(_row(overview, "plain")) == "IDLE"
        for html in (row, page):
            assert _state(html) == "CANNOT RUN" and "IDLE" not in _state(html)
            assert 'data-runnable="false"' in row
            assert "environment <strong" in html and ">failed</strong>" in html
            assert "<code>environment_failed</code>" in html
            assert "could not be installed; the operator has the details" in html
            assert (INSTALLER_WORDS in html) is admin, "the installer's words are the admin's alone"
            if not admin:
                assert "shadow" not in html and str(tmp_path) not in html


def test_a_plugin_being_prepared_shows_preparing(
    make_client: Callable[..., TestClient], registry: PluginRegistry
) -> None:
    assert registry.environments is not None
    key = registry.environments.key_for(
        "broken_env", registry.get_plugin("broken_env").requirements
    )
    client = make_client(client_tokens=["client-token"], admin_token="admin-token")
    client.app.state.services.plugins.preparation.stop(10)  # type: ignore[attr-defined]
    registry.environments._preparing[key] = "broken_env"  # as while its installer runs
    row = _row(client.get("/console", headers=CLIENT).text, "broken_env")
    assert _state(row) == "PREPARING"
    assert ">preparing</strong>" in row and "<code>environment_preparing</code>" in row
