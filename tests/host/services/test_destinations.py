"""The callback destinations' name lookup is bounded in time."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from host.services import destinations
from host.services.destinations import CallbackPolicy, Unresolvable


@pytest.mark.timeout(30)
def test_a_lookup_that_hangs_is_given_up_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name server that never answers holds neither the request that
    checks a callback_url nor a deliverer past RESOLVE_TIMEOUT_S."""
    release = threading.Event()

    def hanging(*args: Any, **kwargs: Any) -> Any:
        release.wait(20)
        raise socket.gaierror(socket.EAI_AGAIN, "no answer")

    monkeypatch.setattr(destinations, "RESOLVE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(destinations.socket, "getaddrinfo", hanging)
    policy = CallbackPolicy.of(["hooks.example.com"], [])
    try:
        started = time.monotonic()
        with pytest.raises(Unresolvable, match="did not resolve within 0.3 s"):
            policy.check("https://hooks.example.com/plughost")
        assert time.monotonic() - started < 2.0
    finally:
        release.set()
