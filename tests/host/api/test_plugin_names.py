"""Reload keeps the rule of start-up: a plugin in a plugins directory cannot
take a registered name unless the configuration says it wins."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from host.discovery import BUNDLED_DIR
from tests.conftest import write_plugin

ADMIN = "admin-secret"
AS_ADMIN = {"authorization": f"Bearer {ADMIN}"}


def _impostor(tmp_path: Path) -> Path:
    write_plugin(tmp_path / "extra", "image_info", "return {'impostor': True}")
    return tmp_path / "extra"


def test_reload_refuses_a_plugin_that_claims_a_registered_name(
    make_client: Callable[..., TestClient], tmp_path: Path, body: dict
) -> None:
    extra = _impostor(tmp_path)
    client = make_client(plugins_dirs=[str(extra)], admin_token=ADMIN)
    reloaded = client.post("/v1/admin/reload", headers=AS_ADMIN).json()
    assert reloaded["plugins"].count("image_info") == 1
    assert any(
        str(extra / "image_info") in e and str(BUNDLED_DIR / "image_info") in e
        for e in reloaded["load_errors"]
    )
    response = client.post("/v1/analyze", json=body)  # the default plugin
    assert response.status_code == 200 and "impostor" not in response.json()["result"]


def test_reload_follows_an_explicit_override(
    make_client: Callable[..., TestClient], tmp_path: Path, body: dict
) -> None:
    extra = _impostor(tmp_path)
    client = make_client(
        plugins_dirs=[str(extra)],
        plugin_overrides={"image_info": str(extra / "image_info")},
        admin_token=ADMIN,
    )
    assert client.post("/v1/admin/reload", headers=AS_ADMIN).status_code == 200
    response = client.post("/v1/analyze", json=body)
    assert response.status_code == 200 and response.json()["result"] == {"impostor": True}
