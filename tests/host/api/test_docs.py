"""The API documentation works on a host with no way out: every asset the
pages load is served by the host itself."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from host import __version__


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_the_host(
    make_client: Callable[..., TestClient], page: str
) -> None:
    client = make_client()
    html = client.get(page)
    assert html.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
    assets += re.findall(r"""url: ?["']([^"']+)["']""", html.text)
    assert assets
    assert not [a for a in assets if a.startswith(("http:", "https:", "//"))], assets
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert len(response.content) > 100, asset


def test_openapi_names_the_installed_version(make_client: Callable[..., TestClient]) -> None:
    assert make_client().get("/openapi.json").json()["info"]["version"] == __version__
