"""The index proxy (`host.indexproxy`) on its own: a connection handed over
as the confining program hands it, forwarded to an allowed host directly
(plain HTTP made origin-form) or through the host's own proxy (with its
credentials), and refused for any other host."""

from __future__ import annotations

import array
import select
import socket
import threading
from collections.abc import Iterator

import pytest

from host.indexproxy import MAX_CONNECTIONS, MAX_REFUSALS_KEPT, IndexProxy

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def server() -> Iterator[tuple[socket.socket, list[bytes]]]:
    """A one-connection server on the host's loopback that records the
    request head it gets and answers 200."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            seen.append(head)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener, seen
    if not seen:  # release the server's accept
        with socket.create_connection(listener.getsockname(), timeout=5) as conn:
            conn.sendall(b"END\r\n\r\n")
    thread.join(5)
    listener.close()


def _through(proxy: IndexProxy, request: bytes) -> bytes:
    """Send `request` on a connection handed to `proxy`; its whole answer."""
    ours, theirs = socket.socketpair()
    fds = array.array("i", [theirs.fileno()])
    proxy.theirs.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    theirs.close()
    with ours:
        ours.settimeout(10)
        ours.sendall(request)
        answer = b""
        while chunk := ours.recv(4096):
            answer += chunk
            if answer.startswith(b"HTTP/1.1 403") or answer.endswith(b"ok"):
                break
    return answer


def test_a_plain_http_request_to_an_allowed_host_goes_there_origin_form(
    server: tuple[socket.socket, list[bytes]],
) -> None:
    listener, seen = server
    port = listener.getsockname()[1]
    proxy = IndexProxy([("127.0.0.1", port)])
    try:
        target = f"http://127.0.0.1:{port}/simple/six/"
        request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        answer = _through(proxy, request)
    finally:
        proxy.close()
    assert answer.endswith(b"ok")
    assert seen[0].startswith(b"GET /simple/six/ HTTP/1.1\r\nHost: 127.0.0.1:")


def test_a_tunnel_goes_through_the_hosts_own_proxy_with_its_credentials(
    server: tuple[socket.socket, list[bytes]],
) -> None:
    listener, seen = server
    upstream = f"http://user:p%40ss@127.0.0.1:{listener.getsockname()[1]}"
    proxy = IndexProxy([("pypi.org", 443)], upstream)
    try:
        answer = _through(proxy, b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n")
    finally:
        proxy.close()
    # The host's proxy answered 200, read by the index proxy: the tunnel is open.
    assert answer.startswith(b"HTTP/1.1 200 Connection established\r\n\r\n")
    assert seen[0].startswith(b"CONNECT pypi.org:443 HTTP/1.1\r\n")
    assert b"Proxy-Authorization: Basic dXNlcjpwQHNz\r\n" in seen[0]  # user:p@ss


def test_any_other_host_is_refused_and_never_connected_to(
    server: tuple[socket.socket, list[bytes]],
) -> None:
    listener, seen = server
    port = listener.getsockname()[1]
    proxy = IndexProxy([("pypi.org", 443)])
    try:
        for request in (
            f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n",
            f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\n\r\n",
            "CONNECT pypi.org:22 HTTP/1.1\r\n\r\n",
            "GET /relative HTTP/1.1\r\n\r\n",
            "CONNECT pypi.org:99999 HTTP/1.1\r\n\r\n",
            "GET http://pypi.org:99999/ HTTP/1.1\r\n\r\n",
            "POST http://pypi.org/ HTTP/1.1\r\n\r\n",
            "GET http://user@pypi.org/ HTTP/1.1\r\n\r\n",
        ):
            assert _through(proxy, request.encode()).startswith(b"HTTP/1.1 403 Forbidden")
    finally:
        proxy.close()
    assert seen == [] and len(proxy.refused) == 8


def test_one_request_per_connection_with_the_allowed_hosts_own_host_header(
    server: tuple[socket.socket, list[bytes]],
) -> None:
    """A second request on a forwarded connection goes nowhere, and the
    installer's Host header never reaches the mirror (a virtual host behind
    it, or a mirror that is itself a proxy, stays out of reach)."""
    listener, seen = server
    port = listener.getsockname()[1]
    proxy = IndexProxy([("127.0.0.1", port)])
    try:
        request = (
            f"GET http://127.0.0.1:{port}/simple/ HTTP/1.1\r\nHost: admin.internal\r\n\r\n"
        ).encode()
        answer = _through(proxy, request)
        # A second request sent at once, after the head, is refused whole.
        twice = request + b"GET http://other.example/x HTTP/1.1\r\n\r\n"
        refused = _through(proxy, twice)
    finally:
        proxy.close()
    assert answer.endswith(b"ok") and refused.startswith(b"HTTP/1.1 403")
    assert len(seen) == 1
    assert b"admin.internal" not in seen[0] and b"other.example" not in seen[0]
    assert f"Host: 127.0.0.1:{port}\r\nConnection: close\r\n".encode() in seen[0]


def test_through_the_hosts_proxy_a_later_request_never_reaches_it(
    server: tuple[socket.socket, list[bytes]],
) -> None:
    """Through the host's own proxy, a forwarded GET is one request with
    `Connection: close`; what the installer sends after it is not passed on."""
    listener, seen = server
    upstream = f"http://127.0.0.1:{listener.getsockname()[1]}"
    proxy = IndexProxy([("pypi.org", 80)], upstream)
    ours, theirs = socket.socketpair()
    fds = array.array("i", [theirs.fileno()])
    try:
        proxy.theirs.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        theirs.close()
        ours.settimeout(10)
        ours.sendall(b"GET http://pypi.org/simple/ HTTP/1.1\r\n\r\n")
        answer = ours.recv(4096)
        try:  # the smuggled one; the proxy may have closed the connection already
            ours.sendall(b"GET http://127.0.0.1:22/secret HTTP/1.1\r\n\r\n")
            rest = ours.recv(4096)
        except (BrokenPipeError, ConnectionResetError):  # closed before or after it
            rest = b""
        assert rest == b""
    finally:
        ours.close()
        proxy.close()
    assert answer.endswith(b"ok")
    assert len(seen) == 1 and seen[0].startswith(b"GET http://pypi.org/simple/ HTTP/1.1\r\n")
    assert b"Connection: close" in seen[0] and b"secret" not in seen[0]


def test_connections_past_the_limit_are_closed_unanswered() -> None:
    proxy = IndexProxy([("pypi.org", 443)])
    held = []
    try:
        for _ in range(MAX_CONNECTIONS + 5):  # each sends nothing: held by the proxy
            ours, theirs = socket.socketpair()
            fds = array.array("i", [theirs.fileno()])
            proxy.theirs.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            theirs.close()
            held.append(ours)
        for ours in held[MAX_CONNECTIONS:]:  # handed over last: closed at once
            ours.settimeout(5)
            assert ours.recv(1) == b""
        readable, _, _ = select.select(held[:MAX_CONNECTIONS], [], [], 0.2)
        assert readable == []  # the first ones are still waiting for their request
    finally:
        for ours in held:
            ours.close()
        proxy.close()


def test_refusals_past_the_kept_number_are_counted_not_kept() -> None:
    """An installer that asks for other hosts without end leaves the host a
    bounded list (and log), and the count of the rest."""
    proxy = IndexProxy([("pypi.org", 443)])
    try:
        for n in range(MAX_REFUSALS_KEPT + 7):
            ours, theirs = socket.socketpair()
            fds = array.array("i", [theirs.fileno()])
            proxy.theirs.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            theirs.close()
            with ours:
                ours.settimeout(10)
                ours.sendall(f"CONNECT host{n}.example:443 HTTP/1.1\r\n\r\n".encode())
                assert ours.recv(4096).startswith(b"HTTP/1.1 403")
    finally:
        proxy.close()
    assert len(proxy.refused) == MAX_REFUSALS_KEPT
    assert proxy.refused_count == MAX_REFUSALS_KEPT + 7
