"""What a plugin prints is its author's (plughost check, run --debug, the
pytest fixture): an HTTP client's answer never carries it, whether the call
succeeded or failed, synchronous or a job."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from host.registry import PluginRegistry
from tests.conftest import write_plugin
from tests.host.api.test_routes import wait_status

PRINTED = "PRINTED-" + "BY-THE-PLUGIN"


@pytest.mark.parametrize("ending", ["return {'ok': True}", "raise ValueError('boom')"])
def test_a_client_never_gets_what_the_plugin_printed(
    tmp_path: Path,
    registry: PluginRegistry,
    make_client: Callable[..., TestClient],
    body: dict,
    ending: str,
) -> None:
    write_plugin(tmp_path, "talker", f"print({PRINTED!r})\n{ending}")
    assert registry.load_directory(tmp_path) == ["talker"]
    client = make_client()
    answer = client.post("/v1/analyze", json={**body, "plugin": "talker"})
    assert answer.status_code in (200, 400), answer.text
    assert PRINTED not in answer.text
    job = client.post("/v1/jobs", json={**body, "plugin": "talker"})
    assert job.status_code == 202, job.text
    record = wait_status(client, job.json()["job"]["id"], {"SUCCESS", "FAILED"}, timeout=30)
    assert PRINTED not in json.dumps(record)
    assert PRINTED not in client.get("/v1/jobs").text
