"""The installer's only way out: a proxy that reaches the package index alone.

On a root host the installer runs in a network namespace of its own
(`sandbox.confined`), which has nothing but loopback. There, the confining
program listens on 127.0.0.1:`PROXY_PORT` (`sandbox.confined`; the installer's `HTTPS_PROXY`
and `HTTP_PROXY`) and hands every connection it accepts, as a descriptor,
to the host over a unix socket pair (`IndexProxy.theirs`). The host serves
each one here: it reads the request head, and only if it names an index
host (`index_hosts`: PyPI's two and the hosts of the operator's index
settings) connects there (through the host's own proxy, if it has one) and
relays the bytes; anything else is answered 403 and closed. So neither the
installer nor a build it runs can reach a service on the host's loopback,
the host's network or the world: only the index, as it needs.

One request per connection: a CONNECT tunnel (which carries TLS the
installer checks itself; through the host's proxy, the proxy's answer is
read here before any tunnel byte passes), or one GET or HEAD of an
`http://` URL (a mirror), sent with the allowed host's own Host header and
`Connection: close`, of which only the answer comes back. At most
MAX_CONNECTIONS at once.
"""

from __future__ import annotations

import array
import base64
import contextlib
import logging
import socket
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

log = logging.getLogger("plughost.installer")

PYPI_HOSTS = (("pypi.org", 443), ("files.pythonhosted.org", 443))
# Settings whose values are index URLs (space or comma separated; uv's
# UV_INDEX entries may be `name=url`).
INDEX_URL_SETTINGS = (
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_FIND_LINKS",
    "UV_INDEX",
    "UV_INDEX_URL",
    "UV_DEFAULT_INDEX",
    "UV_EXTRA_INDEX_URL",
    "UV_FIND_LINKS",
)
# More hosts the index serves its files from (host[:port], comma separated).
EXTRA_HOSTS = "PLUGHOST_INDEX_HOSTS"
MAX_HEAD = 16 * 1024
CONNECT_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 300.0


def index_hosts(env: Mapping[str, str]) -> frozenset[tuple[str, int]]:
    """(host, port) pairs the installer may reach: PyPI's, the hosts of the
    index settings in `env`, and those of PLUGHOST_INDEX_HOSTS."""
    found = set(PYPI_HOSTS)
    for name in INDEX_URL_SETTINGS:
        for item in env.get(name, "").replace(",", " ").split():
            if "=" in item.split("://", 1)[0]:
                item = item.split("=", 1)[1]  # uv's name=url
            parts = urlsplit(item)
            if parts.scheme in ("http", "https") and parts.hostname:
                found.add((parts.hostname.lower(), parts.port or _default_port(parts.scheme)))
    for item in env.get(EXTRA_HOSTS, "").replace(",", " ").split():
        host, _, port = (
            item.rpartition(":") if item.rsplit(":", 1)[-1].isdigit() else (item, "", "")
        )
        found.add((host.lower(), int(port) if port else 443))
    return frozenset(found)


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


@dataclass(frozen=True)
class Request:
    """What the installer asked the proxy for: CONNECT host:port, or a plain
    GET or HEAD of an absolute http:// URL (`path` then its origin form)."""

    method: str
    host: str
    port: int
    path: str
    headers: tuple[tuple[str, str], ...]


# Headers the proxy sets itself, or that concern the hop rather than the
# request: never taken from the installer.
HOP_HEADERS = frozenset(
    {"host", "connection", "keep-alive", "proxy-connection", "proxy-authorization", "te"}
    | {"upgrade", "transfer-encoding", "content-length", "trailer"}
)
MAX_CONNECTIONS = 32  # at once, per preparation: more are closed unanswered
# Refused requests kept (and logged) per preparation; the rest are counted.
MAX_REFUSALS_KEPT = 20


class IndexProxy:
    """Serves the connections a confined installer hands over on `theirs`
    (pass it to the confining program) until `close`: one request each, to
    an allowed host only."""

    def __init__(self, allowed: Iterable[tuple[str, int]], upstream: str | None = None) -> None:
        self.allowed = frozenset(allowed)
        self.upstream = urlsplit(upstream) if upstream else None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._ours, self.theirs = ours, theirs
        self.refused: list[str] = []  # the first MAX_REFUSALS_KEPT, for the installer's log
        self.refused_count = 0
        self._books = threading.Lock()  # connections are served on threads of their own
        self._active = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._thread = threading.Thread(target=self._receive, name="index-proxy", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop taking connections (those being relayed end on their own)."""
        with contextlib.suppress(OSError):
            self.theirs.close()
        with contextlib.suppress(OSError):
            self._ours.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self._ours.close()

    def _receive(self) -> None:
        while True:
            fds = array.array("i")
            try:
                data, ancillary, _, _ = self._ours.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
            except OSError:
                return
            if not data and not ancillary:
                return  # the confining program is gone
            for level, kind, payload in ancillary:  # none if the host had no descriptor free
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            for fd in fds:
                client = socket.socket(fileno=fd)
                if not self._active.acquire(blocking=False):
                    client.close()  # too many at once
                    continue
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            with client:
                client.settimeout(IDLE_TIMEOUT_S)
                try:
                    request = parse_request(_read_head(client))
                except (OSError, ValueError, UnicodeDecodeError) as exc:
                    self._refuse(client, f"malformed request: {exc}"[:200])
                    return
                if (request.host, request.port) not in self.allowed:
                    self._refuse(client, f"{request.method} {request.host}:{request.port}")
                    return
                try:
                    if request.method == "CONNECT":
                        self._tunnel(client, request)
                    else:
                        self._forward(client, request)
                except OSError as exc:
                    log.warning("installer: %s:%s: %s", request.host, request.port, exc)
                    with contextlib.suppress(OSError):
                        client.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
        finally:
            self._active.release()

    def _refuse(self, client: socket.socket, what: str) -> None:
        with self._books:
            self.refused_count += 1
            keep = len(self.refused) < MAX_REFUSALS_KEPT  # an installer may try without end
            if keep:
                self.refused.append(what[:200])
        if keep:
            log.warning("installer: refused %s (not an index host)", what[:200])
        with contextlib.suppress(OSError):
            client.sendall(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")

    def _tunnel(self, client: socket.socket, request: Request) -> None:
        """CONNECT: a tunnel to the host, directly or through the host's
        proxy, whose answer is read here: nothing the installer sends
        reaches the host's proxy but the tunnel's bytes."""
        where = f"{request.host}:{request.port}"
        if self.upstream is None:
            server = socket.create_connection((request.host, request.port), CONNECT_TIMEOUT_S)
            early = b""
        else:
            server = self._to_upstream(f"CONNECT {where} HTTP/1.1", where)
            answer = _read_answer(server)
            status, early = answer.split(b"\r\n", 1)[0], answer.split(b"\r\n\r\n", 1)[1]
            if b" 200" not in status:
                server.close()
                raise OSError(f"the host's proxy answered {status[:80]!r}")
        with server:
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n" + early)
            _relay(client, server)

    def _forward(self, client: socket.socket, request: Request) -> None:
        """GET or HEAD of http://: that one request, with the host's own
        Host header and `Connection: close`; only the answer is relayed
        (nothing more the installer sends goes anywhere)."""
        where = request.host if request.port == 80 else f"{request.host}:{request.port}"
        lines = [f"{name}: {value}" for name, value in request.headers]
        lines += [f"Host: {where}", "Connection: close"]
        if self.upstream is None:
            server = socket.create_connection((request.host, request.port), CONNECT_TIMEOUT_S)
            server.sendall(_head(f"{request.method} {request.path} HTTP/1.1", lines))
        else:
            line = f"{request.method} http://{where}{request.path} HTTP/1.1"
            server = self._to_upstream(line, where, lines)
        with server:
            server.settimeout(IDLE_TIMEOUT_S)
            with contextlib.suppress(OSError):
                while data := server.recv(65536):
                    client.sendall(data)

    def _to_upstream(self, line: str, where: str, lines: list[str] | None = None) -> socket.socket:
        """A connection to the host's own proxy with `line` sent, and the
        proxy's credentials."""
        up = self.upstream
        assert up is not None and up.hostname is not None
        server = socket.create_connection((up.hostname, up.port or 80), CONNECT_TIMEOUT_S)
        extra = list(lines) if lines is not None else [f"Host: {where}"]
        if up.username is not None:
            secret = f"{unquote(up.username)}:{unquote(up.password or '')}".encode()
            extra.append("Proxy-Authorization: Basic " + base64.b64encode(secret).decode())
        server.sendall(_head(line, extra))
        return server


def parse_request(head: bytes) -> Request:
    """The request a head asks for. Raises ValueError for anything but
    CONNECT host:port and GET or HEAD of an absolute http:// URL."""
    first, *rest = head.decode("latin-1").split("\r\n")
    method, target, version = first.split(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not HTTP/1: {version[:20]!r}")
    headers = []
    for line in rest:
        if line:
            name, _, value = line.partition(":")
            if name.strip().lower() not in HOP_HEADERS:
                headers.append((name.strip(), value.strip()))
    if method == "CONNECT":
        host, _, port = target.rpartition(":")
        number = int(port) if port.isdigit() else 0
        if not host or not 0 < number < 65536:
            raise ValueError(f"not host:port: {target[:100]!r}")
        return Request(method, host.strip("[]").lower(), number, "", ())
    if method not in ("GET", "HEAD"):
        raise ValueError(f"method {method[:20]!r}")
    parts = urlsplit(target)
    if parts.scheme != "http" or not parts.hostname or parts.username or parts.password:
        raise ValueError(f"not an http:// URL: {target[:100]!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Request(method, parts.hostname.lower(), parts.port or 80, path, tuple(headers))


def _head(line: str, headers: list[str]) -> bytes:
    return "\r\n".join([line, *headers, "", ""]).encode("latin-1")


def _read_answer(server: socket.socket) -> bytes:
    """The host's proxy's answer head (and whatever came after it)."""
    answer = b""
    server.settimeout(CONNECT_TIMEOUT_S)
    while b"\r\n\r\n" not in answer:
        more = server.recv(4096)
        if not more or len(answer) > MAX_HEAD:
            raise OSError("no answer from the host's proxy")
        answer += more
    return answer


def _read_head(client: socket.socket) -> bytes:
    """The request head, up to and including its blank line; nothing after
    it (a request with a body, or a second one sent at once, is refused)."""
    head = b""
    while b"\r\n\r\n" not in head:
        more = client.recv(4096)
        if not more or len(head) + len(more) > MAX_HEAD:
            raise ValueError("no request head")
        head += more
    if head.index(b"\r\n\r\n") + 4 != len(head):
        raise ValueError("bytes after the head")
    return head


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both sides are done or idle too long."""

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    for sock in (a, b):
        sock.settimeout(IDLE_TIMEOUT_S)
    back = threading.Thread(target=pump, args=(b, a), daemon=True)
    back.start()
    pump(a, b)
    back.join(IDLE_TIMEOUT_S)


def upstream_of(env: Mapping[str, str]) -> str | None:
    """The host's own proxy for the index, where it has one."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if env.get(name):
            return env[name]
    return None
