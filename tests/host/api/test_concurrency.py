"""Hostile and benign plugins side by side: every benign call succeeds."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient

HOSTILE = [
    "busy_loop",
    "memory_in_grandchildren",
    "fork_bomb",
    "segfault",
    "stdout_flood",
    "garbage_frame",
    "setsid_grandchild",
    "huge_allocation",
]


def test_benign_calls_all_succeed_next_to_hostile_ones(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(workers=2, queue_size=64, quarantine_threshold=1000)
    client.app.state.services.plugins.quarantine.threshold = 1000  # keep the hostile ones running
    requests = []
    for round_ in range(3):
        for hostile in HOSTILE:
            requests.append(("hostile", hostile))
            requests.append(("benign", ["image_info", "image_hash", "dominant_colors"][round_]))

    def call(item: tuple[str, str]) -> tuple[str, str, int, dict]:
        kind, plugin = item
        response = client.post("/v1/analyze", json={**body, "plugin": plugin})
        return kind, plugin, response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, requests, timeout=120))
    benign = [r for r in results if r[0] == "benign"]
    assert len(benign) == 3 * len(HOSTILE)
    assert all(status == 200 for _, _, status, _ in benign), [r for r in benign if r[2] != 200]
    hostile = [r for r in results if r[0] == "hostile"]
    assert all(status == 400 for _, _, status, _ in hostile), [r for r in hostile if r[2] != 400]
    assert client.get("/healthz").status_code == 200
