"""Slow clients against a real `plughost serve`: connections that never finish
their headers (or their body) are cut off at their deadline, never hold more
than the connection cap, and neither starve benign calls nor flood the log."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from host.api.server import MAX_HEADER_BYTES, MAX_PIPELINED, RESERVED_FDS, connection_cap
from tests.host.test_serve import BODY, free_port, start_server, stop

pytestmark = [pytest.mark.no_leak_check, pytest.mark.timeout(120)]
CAP = 100
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
SLOW_CLIENTS = 300


def call(port: int, method: str, path: str, body: dict | None, timeout_s: float) -> int:
    """The status of one benign request, which must be answered within `timeout_s`."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as response:
        return int(response.status)


def open_slow(port: int, first_bytes: bytes) -> socket.socket | None:
    """A connection that sends `first_bytes` and then nothing; None if refused."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    except OSError:
        return None
    try:
        sock.sendall(first_bytes)
    except OSError:
        pass  # cut off already: it counts as closed below
    return sock


def wait_closed(socks: list[socket.socket], deadline_s: float) -> int:
    """How many of `socks` the server has closed (EOF or reset) within `deadline_s`."""
    closed = 0
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + deadline_s
        while closed < len(socks) and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data or data.startswith(b"HTTP/1.1 503"):
                    selector.unregister(sock)
                    closed += 1
    return closed


@pytest.fixture
def server(tmp_path: Path) -> tuple[int, object]:
    config = tmp_path / "plughost.toml"
    config.write_text(
        f"self_check = false\nmax_connections = {CAP}\nheader_timeout_s = {HEADER_TIMEOUT_S}\n"
        f"body_timeout_s = {BODY_TIMEOUT_S}\nlog_repeat_limit = 5\n"
    )
    port = free_port()
    proc = start_server(tmp_path / "jobs.sqlite3", port, "--config", str(config))
    yield port, proc
    stop(proc)


def test_slow_clients_neither_starve_benign_calls_nor_flood_the_log(server: tuple) -> None:
    port, proc = server
    slow: list[socket.socket] = []
    held = 0
    try:
        for i in range(SLOW_CLIENTS):  # headers begun, never finished
            sock = open_slow(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            if sock is not None:
                slow.append(sock)
            if i % 10 == 0:
                held = max(held, len(os.listdir(f"/proc/{proc.pid}/fd")))
        # Benign calls are answered at once, not after the slow clients time out.
        assert call(port, "GET", "/healthz", None, timeout_s=HEADER_TIMEOUT_S) == 200
        assert call(port, "POST", "/v1/analyze", {**BODY, "plugin": "image_info"}, 15) == 200
        # Every slow client is cut off: the oldest to make room, the rest at their deadline.
        assert wait_closed(slow, HEADER_TIMEOUT_S + 5) == len(slow)
    finally:
        for sock in slow:
            sock.close()
    # Connections plus the accepted sockets not yet seen by the protocol (a few backlogs).
    assert held < 2 * CAP + 40, f"server held {held} descriptors with a cap of {CAP} connections"
    stop(proc)
    log = proc.log.read_text()  # type: ignore[attr-defined]
    lines = log.splitlines()
    assert len(lines) < 80 and len(log) < 32_000, f"{len(lines)} log lines, {len(log)} bytes"
    assert any('"dropped"' in line for line in lines) or len(lines) < 40


def test_a_client_that_stalls_in_its_body_is_cut_off(server: tuple) -> None:
    port, _ = server
    head = b"POST /v1/analyze HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    stalled = open_slow(port, head + b"content-length: 1000\r\n\r\n" + b'{"image": "')
    assert stalled is not None
    try:
        started = time.monotonic()
        assert wait_closed([stalled], BODY_TIMEOUT_S + 5) == 1
        assert time.monotonic() - started >= BODY_TIMEOUT_S - 0.5  # the deadline, not before
    finally:
        stalled.close()
    assert call(port, "GET", "/healthz", None, timeout_s=5) == 200


def test_connection_cap_leaves_descriptors_for_the_host() -> None:
    assert connection_cap(512, 20_000) == 512
    assert connection_cap(512, 300) == 300 - RESERVED_FDS
    assert connection_cap(512, 100) == 1


def test_headers_past_their_cap_are_answered_400_and_the_connection_closed(
    server: tuple,
) -> None:
    port = server[0]

    filler = b"x-filler: " + b"a" * 1000 + b"\r\n"
    head = b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + filler * (MAX_HEADER_BYTES // len(filler) + 2)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the server may close before it has read it all
            sock.sendall(head)
        answer = b""
        while True:
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert f"over {MAX_HEADER_BYTES} bytes".encode() in answer
    # Headers within the cap are served on the same server.
    ok = b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + filler * 8 + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(ok)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def answer_to(port: int, sent: list[bytes]) -> bytes:
    """All the server answers to `sent` (written in that many pieces) before it closes."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the server may close before it has read it all
            for piece in sent:
                sock.sendall(piece)
        with contextlib.suppress(OSError):
            while more := sock.recv(65536):
                answer += more
    return answer


def test_headers_past_their_cap_are_refused_when_they_arrive_whole(server: tuple) -> None:
    port = server[0]
    filler = b"x-filler: " + b"a" * 1000 + b"\r\n"
    # A whole request in one write: the server reads it in one piece.
    head = b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + filler * (MAX_HEADER_BYTES // len(filler) + 4)
    answer = answer_to(port, [head + b"\r\n"])
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert f"over {MAX_HEADER_BYTES} bytes".encode() in answer
    # The same headers behind a small request on the same connection.
    answer = answer_to(port, [b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n" + head + b"\r\n"])
    assert f"over {MAX_HEADER_BYTES} bytes".encode() in answer, answer[-300:]


def test_trailers_count_against_the_header_cap(server: tuple) -> None:
    port = server[0]
    head = b"POST /v1/analyze HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    start = head + b"transfer-encoding: chunked\r\n\r\n1\r\n{\r\n0\r\n"
    trailer = b"x-trailer: " + b"b" * 1000 + b"\r\n"
    # Endless trailers, each line whole, or one trailer in pieces (more than
    # the server reads at once: the first read of a trailer is not seen whole).
    for pieces in ([trailer] * 64, [b"x-trailer: "] + [b"b" * 1000] * 600):
        started = time.monotonic()
        answer = answer_to(port, [start, *pieces])
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert f"over {MAX_HEADER_BYTES} bytes".encode() in answer
        assert time.monotonic() - started < BODY_TIMEOUT_S  # refused, not cut off at the deadline


def test_clients_that_never_read_their_answers_hold_no_connection(tmp_path: Path) -> None:
    cap = 8
    config = tmp_path / "plughost.toml"
    config.write_text(
        f"self_check = false\nmax_connections = {cap}\nheader_timeout_s = {HEADER_TIMEOUT_S}\n"
        f"body_timeout_s = {BODY_TIMEOUT_S}\nlog_repeat_limit = 5\n"
    )
    port = free_port()
    proc = start_server(tmp_path / "jobs.sqlite3", port, "--config", str(config))
    # Requests ahead of their answers, megabytes of answers, and nothing read:
    # the app's send waits for room that never comes.
    ahead = b"GET /console HTTP/1.1\r\nhost: x\r\n\r\n" * MAX_PIPELINED
    stalled: list[socket.socket] = []
    try:
        for _ in range(cap):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            sock.sendall(ahead)
            stalled.append(sock)
        # Each is cut off once what waits for it stops shrinking for the body deadline.
        deadline = time.monotonic() + 40
        while True:
            try:
                assert call(port, "GET", "/healthz", None, timeout_s=5) == 200
                break
            except urllib.error.HTTPError as exc:
                assert exc.code == 503 and time.monotonic() < deadline, "held for 40 s"
            time.sleep(0.5)
    finally:
        for sock in stalled:
            sock.close()
        stop(proc)
    log = proc.log.read_text()  # type: ignore[attr-defined]
    assert "read nothing in" in log
    assert "Exception in ASGI application" not in log  # the app saw the client gone


def test_requests_far_ahead_of_their_answers_are_refused(server: tuple, tmp_path: Path) -> None:
    port, proc = server
    before = int(psutil.Process(proc.pid).memory_info().rss)
    # Thousands of requests in one write: each would hold its scope in a queue.
    answer = answer_to(port, [b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n" * 60_000])
    assert f"More than {MAX_PIPELINED} requests".encode() in answer, answer[-300:]
    assert answer.count(b"HTTP/1.1 200") <= MAX_PIPELINED + 1
    grown = int(psutil.Process(proc.pid).memory_info().rss) - before
    assert grown < 32 * 1024 * 1024, f"the server grew by {grown} bytes"
    # Requests a few ahead of their answers are all answered.
    answer = answer_to(port, [b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n" * 4])
    assert answer.count(b"HTTP/1.1 200") == 4
