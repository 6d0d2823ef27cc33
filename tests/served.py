"""An ASGI app served over real HTTP on loopback: uvicorn on a thread of
the test's own, with the app's lifespan. Every wait has a deadline.

The loop is asyncio's, not the uvloop `plughost serve` runs: uvloop keeps a
pipe open for the rest of the process, which the leak check would count."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx2 as httpx
import uvicorn

START_S = 60.0
STOP_S = 30.0


@contextmanager
def served(app: Any) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, loop="asyncio", http="h11", lifespan="on", log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="served", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + START_S
        while not server.started:
            assert thread.is_alive(), "the server's start-up failed"
            assert time.monotonic() < deadline, f"the server did not start in {START_S} s"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(STOP_S)
        sock.close()
    assert not thread.is_alive(), f"the server did not stop in {STOP_S} s"


def timed(client: httpx.Client, path: str) -> float:
    """Seconds `GET path` took to answer 200."""
    started = time.monotonic()
    answer = client.get(path)
    took = time.monotonic() - started
    assert answer.status_code == 200, (path, answer.status_code, answer.text[:200])
    return took
