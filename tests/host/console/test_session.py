"""Sessions and the sign-in throttle on their own (the console's routes are
tested in tests/host/api/test_console*.py)."""

from __future__ import annotations

import time

# host.console.session imports host.api.auth, and the package host.api
# imports the console's routes: load the API first, as the server does.
import host.api  # noqa: F401
from host.console.session import LoginThrottle, SessionStore


def test_the_throttle_counts_each_address_apart() -> None:
    throttle = LoginThrottle(failures=2, window_s=60)
    throttle.failed("192.0.2.1")
    throttle.failed("192.0.2.1")
    assert throttle.retry_after("192.0.2.1") is not None
    assert throttle.retry_after("192.0.2.2") is None


def test_an_ipv6_client_is_counted_by_its_64_prefix() -> None:
    from types import SimpleNamespace
    from typing import Any

    from host.console.session import client_address

    def request(host: str) -> Any:
        return SimpleNamespace(client=SimpleNamespace(host=host))

    assert client_address(request("2001:db8:1:2::5")) == client_address(request("2001:db8:1:2::9"))
    assert client_address(request("2001:db8:1:3::5")) != client_address(request("2001:db8:1:2::5"))
    assert client_address(request("192.0.2.7")) == "192.0.2.7"


def test_sessions_expire_and_close_and_stay_bounded() -> None:
    store = SessionStore(lifetime_s=0.2, max_sessions=3)
    first = store.open(b"digest")
    assert store.get(first) is not None
    store.close(first)
    assert store.get(first) is None
    ids = [store.open(b"digest") for _ in range(4)]
    assert store.get(ids[0]) is None and all(store.get(i) is not None for i in ids[1:])
    time.sleep(0.25)
    assert all(store.get(i) is None for i in ids)
