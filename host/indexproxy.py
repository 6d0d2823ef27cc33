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

A CONNECT tunnel carries TLS the installer checks itself; a plain-HTTP
request (an `http://` mirror) is forwarded with its request line made
origin-form. Nothing is cached or rewritten beyond that.
"""

from __future__ import annotations

import array
import base64
import contextlib
import logging
import socket
import threading
from collections.abc import Iterable, Mapping
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


class IndexProxy:
    """Serves the connections a confined installer hands over on `theirs`
    (pass it to the confining program) until `close`."""

    def __init__(self, allowed: Iterable[tuple[str, int]], upstream: str | None = None) -> None:
        self.allowed = frozenset(allowed)
        self.upstream = urlsplit(upstream) if upstream else None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._ours, self.theirs = ours, theirs
        self.refused: list[str] = []
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
            try:
                fds = array.array("i")
                _, ancillary, _, _ = self._ours.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
            except OSError:
                return
            if not ancillary:
                return  # the confining program is gone
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            for fd in fds:
                client = socket.socket(fileno=fd)
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            client.settimeout(IDLE_TIMEOUT_S)
            try:
                head = _read_head(client)
                method, target, version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            except (OSError, ValueError, UnicodeDecodeError):
                return
            host, port, forwarded = _destination(method, target, head, version)
            if host is None or (host, port) not in self.allowed:
                self.refused.append(f"{method} {target}"[:200])
                log.warning("installer: refused %s %s (not an index host)", method, target[:200])
                with contextlib.suppress(OSError):
                    client.sendall(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                return
            try:
                server = self._connect(host, port, method, target, head)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    client.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                log.warning("installer: %s:%s unreachable: %s", host, port, exc)
                return
            with server:
                if method == "CONNECT" and self.upstream is None:
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                elif method != "CONNECT" and self.upstream is None:
                    server.sendall(forwarded)
                _relay(client, server)

    def _connect(
        self, host: str, port: int, method: str, target: str, head: bytes
    ) -> socket.socket:
        """A connection to the destination, or to the host's own proxy with
        the request passed on (its answer goes back to the installer as is)."""
        if self.upstream is None or not self.upstream.hostname:
            return socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        up = self.upstream
        server = socket.create_connection((up.hostname, up.port or 80), timeout=CONNECT_TIMEOUT_S)
        lines = [line for line in head.split(b"\r\n") if line][1:]
        lines = [line for line in lines if not line.lower().startswith(b"proxy-authorization:")]
        if up.username is not None:
            secret = f"{unquote(up.username)}:{unquote(up.password or '')}".encode()
            lines.append(b"Proxy-Authorization: Basic " + base64.b64encode(secret))
        request = f"{method} {target} HTTP/1.1".encode("latin-1")
        server.sendall(b"\r\n".join([request, *lines]) + b"\r\n\r\n")
        return server


def _read_head(client: socket.socket) -> bytes:
    """The request head, up to and including its blank line."""
    head = b""
    while b"\r\n\r\n" not in head:
        more = client.recv(4096)
        if not more or len(head) + len(more) > MAX_HEAD:
            raise ValueError("no request head")
        head += more
    end = head.index(b"\r\n\r\n") + 4
    if end != len(head):
        raise ValueError("bytes after the head")  # no client sends a body before the answer here
    return head


def _destination(
    method: str, target: str, head: bytes, version: str
) -> tuple[str | None, int, bytes]:
    """(host, port) a request is for, and for plain HTTP the request to send
    (origin-form); (None, 0, b"") for anything else."""
    if method == "CONNECT":
        host, _, port = target.rpartition(":")
        if not port.isdigit() or not host:
            return None, 0, b""
        return host.strip("[]").lower(), int(port), b""
    parts = urlsplit(target)
    if parts.scheme != "http" or not parts.hostname:
        return None, 0, b""
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    rest = head.split(b"\r\n", 1)[1]
    forwarded = f"{method} {path} {version}\r\n".encode("latin-1") + rest
    return parts.hostname.lower(), parts.port or 80, forwarded


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
