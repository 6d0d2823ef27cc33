"""Plugin environments and options schemas through the HTTP API."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from host.discovery import discover
from host.registry import PluginRegistry
from tests.host.conftest import check_versions

pytestmark = pytest.mark.timeout(300)


def test_conflicting_dependencies_both_run_through_the_api(
    conflicting: Path,
    registry: PluginRegistry,
    make_client: Callable[..., TestClient],
    png: bytes,
) -> None:
    discover(registry, [conflicting])
    client = make_client()
    for name in ("np_stats", "six_new"):
        deadline_ready = _wait_ready(client, name)
        assert deadline_ready, client.get(f"/v1/plugins/{name}").json()
        body = {"plugin": name, "image": base64.b64encode(png).decode(), "mime_type": "image/png"}
        answer = client.post("/v1/analyze", json=body)
        assert answer.status_code == 200, answer.text
        check_versions(answer.json()["result"], name)
    described = client.get("/v1/plugins/np_stats").json()
    assert described["dependencies"] == ["numpy>=1.26,<3", "six==1.16.0"]
    assert described["environment"]["status"] == "ready"


def _wait_ready(client: TestClient, name: str) -> bool:
    """The server prepares environments on a thread after start-up."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = client.get(f"/v1/plugins/{name}").json()["environment"]["status"]
        if status == "ready":
            return True
        if status == "failed":
            return False
        time.sleep(0.2)
    return False


def test_options_are_checked_against_the_schema(
    registry: PluginRegistry, make_client: Callable[..., TestClient], png: bytes
) -> None:
    client = make_client()
    image = base64.b64encode(png).decode()
    bad = {"plugin": "image_probe", "image": image, "mime_type": "image/png"}
    answer = client.post("/v1/analyze", json={**bad, "options": {"digest": "yes"}})
    assert answer.status_code == 400
    assert answer.json()["detail"]["details"]["reason"] == "invalid_input"
    assert answer.json()["detail"]["message"] == "options.digest: 'yes' is not of type 'boolean'"
    unknown = client.post("/v1/analyze", json={**bad, "options": {"colour": 1}})
    assert unknown.status_code == 400 and "colour" in unknown.json()["detail"]["message"]
    good = client.post("/v1/analyze", json={**bad, "options": {"digest": False}})
    assert good.status_code == 200 and "sha256" not in good.json()["result"]
    schema = client.get("/v1/plugins/image_probe").json()["options_schema"]
    assert schema["properties"]["digest"]["type"] == "boolean"


def test_options_to_a_plugin_without_a_schema_are_warned_about_once(
    registry: PluginRegistry,
    make_client: Callable[..., TestClient],
    png: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = make_client()
    body = {
        "plugin": "image_info",
        "image": base64.b64encode(png).decode(),
        "mime_type": "image/png",
    }
    for _ in range(2):
        answer = client.post("/v1/analyze", json={**body, "options": {"colour": "red"}})
        assert answer.status_code == 200
    warnings = [r for r in caplog.records if "declares no options schema" in r.getMessage()]
    assert len(warnings) == 1 and "'colour'" in warnings[0].getMessage()


def test_a_stopping_server_leaves_no_preparation_running(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import host.preparation as preparation

    begun: list[Path] = []

    def slow_compile(directory: Path) -> int:
        begun.append(Path(directory))
        time.sleep(0.1)  # a plugin that takes a while to compile
        return 0

    monkeypatch.setattr(preparation, "compile_plugin", slow_compile)
    client = make_client()  # its start begins the preparation of every plugin
    deadline = time.monotonic() + 5
    while not begun and time.monotonic() < deadline:
        time.sleep(0.01)
    assert begun
    client.__exit__(None, None, None)
    # Stopped within the plugin it was on: nothing writes in a plugin's
    # directory, or holds a descriptor, once the server is gone.
    assert not [t for t in threading.enumerate() if t.name == "plughost-prepare"]
    assert len(begun) < 10
