"""What the console tells of a plugin's condition and figures, over HTTP: a
plugin that cannot run is not IDLE, percentiles are those of the calls'
own durations, a peak not measured reads as none, a lifted quarantine says
what it leaves, and every badge is explained."""

from __future__ import annotations

import re
from collections.abc import Callable

from fastapi.testclient import TestClient

from host.console.states import BADGES
from host.metrics import MiB
from tests.host.api.test_console import sign_in


def _row(page: str, plugin: str) -> str:
    found = re.search(rf'<tr id="plugin-{plugin}".*?</tr>', page, re.S)
    assert found, f"no row for {plugin}"
    return found.group(0)


def _text(html: str, testid: str) -> str:
    found = re.search(rf'data-testid="{testid}"[^>]*>(.*?)</', html, re.S)
    assert found, f"nothing marked {testid}"
    return found.group(1).strip()


def test_percentiles_are_those_of_the_recorded_durations(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(admin_token="a-token")
    metrics = client.app.state.services.plugins.metrics  # type: ignore[attr-defined]
    metrics.observe_call("image_info", "success", 1.049, 40 * MiB)
    metrics.observe_call("image_info", "success", 0.525, 30 * MiB)
    metrics.observe_call("raise_kaboom", "plugin_raised", 0.0312, 20 * MiB)
    sign_in(client, "a-token")
    page = client.get("/console").text
    # Estimated inside the (0.5, 1] and (1, 2.5] buckets these read 1000 / 2350 ms.
    assert _text(_row(page, "image_info"), "latency") == "525 ms / 1049 ms"
    assert _text(_row(page, "raise_kaboom"), "latency") == "31.2 ms / 31.2 ms"
    plugin = client.get("/console/plugins/image_info").text
    assert _text(plugin, "latency") == "525 ms / 1049 ms"
    assert _text(plugin, "peak") == "40 MB / 40 MB"


def test_a_client_sees_the_percentiles_of_its_own_calls(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(client_tokens=["c1", "c2"])
    metrics = client.app.state.services.plugins.metrics  # type: ignore[attr-defined]
    sign_in(client, "c1")
    owner = client.get("/console").text
    mine = re.search(r"signed in as <strong>(client-[0-9a-f]+)</strong>", owner)
    assert mine
    metrics.observe_call("image_info", "success", 2.0)
    metrics.observe_own("image_info", "client-someone-else", "success", 2.0)
    metrics.observe_call("image_info", "success", 0.2)
    metrics.observe_own("image_info", mine.group(1), "success", 0.2)
    assert _text(_row(client.get("/console").text, "image_info"), "latency") == "200 ms / 200 ms"


def test_a_call_whose_peak_was_not_measured_shows_none(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(admin_token="a-token")
    metrics = client.app.state.services.plugins.metrics  # type: ignore[attr-defined]
    metrics.observe_call("segfault", "crashed", 0.05, 0)  # never sampled: no peak
    metrics.observe_call("segfault", "crashed", 0.05, None)
    sign_in(client, "a-token")
    row = _row(client.get("/console").text, "segfault")
    assert _text(row, "peak") == "—" and 'title="not measured"' in row
    assert "0 MB<" not in row
    plugin = client.get("/console/plugins/segfault").text
    assert _text(plugin, "peak") == "— / —" and "not measured" in plugin


def test_a_lifted_quarantine_says_the_next_call_will_tell(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(admin_token="a-token")
    client.app.state.services.plugins.quarantine.threshold = 1  # type: ignore[attr-defined]
    client.post("/v1/analyze", json={**body, "plugin": "segfault"})
    sign_in(client, "a-token")
    quarantined = client.get("/console/plugins/segfault").text
    assert 'data-testid="quarantine"' in quarantined and 'data-testid="lifted"' not in quarantined
    page = client.get("/console/confirm/reset?name=segfault").text
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert csrf
    done = client.post("/console/plugins/segfault/quarantine/reset", data={"csrf": csrf.group(1)})
    # SPEC: the registry's state is the last call's; lifting the quarantine keeps it.
    assert client.get("/v1/plugins/segfault").json()["state"] == "UNAVAILABLE"
    for html in (done.text, _row(client.get("/console").text, "segfault")):
        assert _text(html, "state") == "UNAVAILABLE"
        assert _text(html, "lifted") == "quarantine lifted: the next call will tell"
    client.post("/v1/analyze", json=body)
    client.post("/v1/analyze", json={**body, "plugin": "segfault"})  # the next call tells
    assert 'data-testid="lifted"' not in _row(client.get("/console").text, "segfault")


def test_every_state_badge_is_explained_on_the_page(client: TestClient, body: dict) -> None:
    client.post("/v1/analyze", json=body)
    client.post("/v1/analyze", json={**body, "plugin": "raise_kaboom"})
    page = client.get("/console").text
    success = re.search(r'data-testid="state" title="([^"]+)">SUCCESS<', page)
    assert success and "last call returned a result" in success.group(1)
    error = re.search(r'title="([^"]+)">ERROR<', _row(page, "raise_kaboom").replace("&#39;", "'"))
    assert error and "plugin's own code" in error.group(1) and "recent outcomes" in error.group(1)
    for where in (page, client.get("/console/plugins/raise_kaboom").text):
        legend = re.search(r'<dl data-testid="legend">.*?</dl>', where, re.S)
        assert legend, "no legend"
        for badge in BADGES.values():
            assert f">{badge.label}</span></dt>" in legend.group(0)
        assert "quarantine lifted" in legend.group(0) and "quarantined" in legend.group(0)
    plugin = client.get("/console/plugins/raise_kaboom").text
    assert "Read the recent outcomes" in _text(plugin, "explanation")
