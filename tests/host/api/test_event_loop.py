"""A slow job store (a database held back) never stalls the event loop:
while one client's submission waits on the store, `/healthz` and other
clients are answered in their usual time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from host.services.store import SQLiteJobStore

pytestmark = pytest.mark.timeout(90)
HOLD_S = 20.0  # how long the store keeps a caller waiting, at most
ANSWERED_S = 5.0  # far under HOLD_S: a stalled loop could not answer in it


class HeldStore:
    """A SQLite job store that can be held back: while held, every call
    waits (at most HOLD_S) before it reaches the database."""

    def __init__(self, store: SQLiteJobStore) -> None:
        self._store = store
        self._open = threading.Event()
        self._open.set()
        self.waiting = threading.Event()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if not callable(attribute):
            return attribute

        def held(*args: Any, **kwargs: Any) -> Any:
            if not self._open.is_set():
                self.waiting.set()
                self._open.wait(HOLD_S)
            return attribute(*args, **kwargs)

        return held


@pytest.mark.parametrize("route", ["/v1/analyze", "/v1/jobs"])
def test_a_held_store_stalls_neither_healthz_nor_other_clients(
    make_client: Callable[..., TestClient], body: dict, tmp_path: Path, route: str
) -> None:
    store = HeldStore(SQLiteJobStore(str(tmp_path / "jobs.sqlite3")))
    client = make_client(store=store)
    answers: list[int] = []
    store.hold()
    submitter = threading.Thread(
        target=lambda: answers.append(client.post(route, json=body).status_code)
    )
    submitter.start()
    try:
        assert store.waiting.wait(10), "the submission never reached the store"
        started = time.monotonic()
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/plugins/image_info").status_code == 200
        took = time.monotonic() - started
        assert submitter.is_alive(), "the submission did not wait for the store"
    finally:
        store.release()
        submitter.join(30)
    assert took < ANSWERED_S, f"the loop answered after {took:.1f} s"
    assert answers and answers[0] in (200, 202)
