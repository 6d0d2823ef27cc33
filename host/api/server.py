"""How the API is served: uvicorn, with the connection limits it lacks.

uvicorn's httptools protocol (llhttp, a C parser: a third of the CPU per
request of its h11 protocol) closes an idle keep-alive connection, but it
has no deadline for a request's headers or body, no cap on connections and
no limit on the size of a request's headers: clients that never finish
their headers hold a descriptor each until the host has none left (then
asyncio logs `socket.accept() out of system resource` in a loop).
`LimitedHttpProtocol` adds, per connection::

    accepted ──> headers (header_timeout_s) ──> body (body_timeout_s) ──> app
        ^                                                                 |
        └──────────── response sent, keep-alive (uvicorn's timer) <───────┘

- a deadline for each phase a client controls: waiting for the request's
  headers, then for its body; a client that misses one is disconnected;
- a cap on open connections: one past `max_connections` closes the
  connection that has waited longest for its headers, or, when every
  connection is busy with a request, is itself answered 503 and closed;
- a cap on a request's headers, MAX_HEADER_BYTES (h11's default, which the
  h11 protocol enforced): a client that sends more before its headers end,
  whether they arrive in one read or many, is answered 400 and closed; a
  chunked body's trailers get the same cap and are dropped (never merged
  into the request's headers, which the app reads after the body too);
- at most MAX_PIPELINED requests sent ahead of their answers (each queued
  one holds its scope): past that, 400 and closed;
- a deadline for the client to read its answers: when what waits to be
  written to it (the transport's buffer, above its high-water mark, or left
  at a close) does not shrink for body_timeout_s, the connection is
  aborted. Without it a client that pipelines requests for large answers
  and reads nothing holds its connection, and the app's send, for ever.

`serve` raises the descriptor limit to its hard maximum, keeps the cap
below what that leaves, and runs uvicorn with the protocol and a listen
backlog of a quarter of the cap: asyncio accepts a backlog's worth of
connections per wake-up and they reach the protocol a few loop iterations
later, so open descriptors stay below about twice the cap.

The address is taken first (`listen`), before the services are built and
the self-check runs: a port another process holds is a one-line error at
once (`AddressUnavailable`), not a failure after the whole start-up, and
uvicorn is handed that very socket, so nothing can take the port in
between. Clients that connect during the start-up wait in the backlog.
"""

from __future__ import annotations

import asyncio
import encodings.idna  # noqa: F401 - uvloop encodes the bound host with it; loaded while root
import errno
import json
import logging
import resource
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from host.config import Settings
from host.errors import envelope

log = logging.getLogger("plughost.api")
# Descriptors kept free of connections: the job store, the sandbox's pipes
# and sockets, log files.
RESERVED_FDS = 256
# uvicorn's exit status for a start-up that failed.
STARTUP_FAILURE = 3
# How long a stopping server waits for its open requests (uvicorn's graceful
# period, after which it cancels them), and when within it the analyses still
# waiting for their jobs stop waiting and answer 202 with the job to follow.
GRACEFUL_S = 10
STOP_WAITING_S = 8.5
# Bytes a request may send before its headers end (h11's limit, 16 KiB).
MAX_HEADER_BYTES = 16 * 1024
# Requests a client may send ahead of their answers (HTTP/1.1 pipelining).
MAX_PIPELINED = 16


def _refusal() -> bytes:
    error = envelope("overloaded", "too many open connections; retry later", retry_after_s=1)
    body = json.dumps({"detail": error["error"]}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"retry-after: 1\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body deadlines, a
    connection cap and a cap on a request's headers.

    Configure a subclass with `configured`; uvicorn creates one per connection.
    """

    header_timeout_s = 10.0
    body_timeout_s = 30.0
    max_connections = 256

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = ""  # "headers", "body", or "" (the app has the request, or closed)
        self._since = 0.0
        self._deadline: asyncio.TimerHandle | None = None
        # Where the parser is: "" (between requests), "headers" or "body".
        self._parsing = ""
        # Two lower bounds of a request's header (or trailer) bytes: the reads
        # that began among them, and the URL and header lines parsed so far.
        self._header_bytes = 0
        self._parsed_bytes = 0
        self._chunk_open = False  # a chunk's size line parsed, none of its data yet
        self._chunk_events = 0  # chunk headers, chunk data and chunk ends parsed
        self._refused = ""  # why the request is answered 400, if it is
        self._write_deadline: asyncio.TimerHandle | None = None
        self._running: Any = None  # the request the app has (uvicorn's cycle)

    @classmethod
    def configured(
        cls, header_timeout_s: float, body_timeout_s: float, max_connections: int
    ) -> type[LimitedHttpProtocol]:
        """A subclass with these limits, for uvicorn's `http` setting."""
        limits = {
            "header_timeout_s": header_timeout_s,
            "body_timeout_s": body_timeout_s,
            "max_connections": max_connections,
        }
        return type(cls.__name__, (cls,), limits)

    # -- uvicorn's hooks ----------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._make_room():
            log.warning("connection refused: %d connections open", self.max_connections)
            self._phase = "closed"
            self.transport.write(_refusal())
            self.transport.close()
            return
        self._track()

    def data_received(self, data: bytes) -> None:
        if self._parsing != "body":
            self._header_bytes += len(data)
        trailers, events = self._chunk_open, self._chunk_events
        super().data_received(data)
        if trailers and self._chunk_open and events == self._chunk_events:
            # After the last chunk's size line only trailers come: all of it.
            self._header_bytes += len(data)
        if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            self._refused = f"Request headers over {MAX_HEADER_BYTES} bytes."
            self.send_400_response(self._refused)
        if self.transport.is_closing():
            self._close()
            return
        self._track()

    def send_400_response(self, msg: str) -> None:
        super().send_400_response(self._refused or msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._parsing = "headers"
        self._parsed_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count_parsed(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_parsed(len(name) + len(value) + 4)
        if self._parsing == "body":
            return  # a trailer: never merged into the request's headers
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._parsing = "body"
        self._header_bytes = self._parsed_bytes = 0
        if len(self.pipeline) >= MAX_PIPELINED:
            # Each queued request holds its scope until the app gets to it.
            self._refused = f"More than {MAX_PIPELINED} requests sent ahead of their answers."
            raise ValueError(self._refused)  # stops the parser: 400
        super().on_headers_complete()

    def on_chunk_header(self) -> None:
        self._chunk_open = True
        self._chunk_events += 1
        self._header_bytes = 0  # counts the trailers, if this chunk is the last

    def on_body(self, body: bytes) -> None:
        self._chunk_open = False
        self._chunk_events += 1
        super().on_body(body)

    def on_chunk_complete(self) -> None:
        self._chunk_open = False
        self._chunk_events += 1

    def on_message_complete(self) -> None:
        self._parsing = ""
        super().on_message_complete()

    def _count_parsed(self, size: int) -> None:
        """Count header (or trailer) bytes as the parser delivers them: a whole
        request read at once is refused as surely as one sent in pieces."""
        self._parsed_bytes += size
        if self._parsed_bytes > MAX_HEADER_BYTES:
            self._refused = f"Request headers over {MAX_HEADER_BYTES} bytes."
            raise ValueError(self._refused)  # stops the parser: 400

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = "closed"
        self._cancel()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None
        running = self._running
        if running is not None and running is not self.cycle and not running.response_complete:
            # uvicorn tells only the last request parsed: the app would write
            # the one it has to a closed connection.
            running.disconnected = True
            running.message_event.set()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_writes()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    # -- deadlines and the cap -----------------------------------------------

    def _track(self) -> None:
        """Arm the deadline of the phase the connection is in now."""
        if self._phase == "closed" or self.transport.is_closing():
            return
        phase = self._parsing
        if phase != "body" and (self.pipeline or self._app_busy()):
            phase = ""  # the app has a request: no deadline until its response is complete
        elif phase == "":
            phase = "headers"  # waiting for the next request
        if phase == self._phase:
            return
        self._cancel()
        self._phase = phase
        self._since = self.loop.time()
        if phase:
            timeout = self.header_timeout_s if phase == "headers" else self.body_timeout_s
            self._deadline = self.loop.call_later(timeout, self._expire, phase)

    def _app_busy(self) -> bool:
        cycle = getattr(self, "cycle", None)  # set at a request's headers
        return cycle is not None and not cycle.response_complete

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, phase: str) -> None:
        if self._phase != phase or self.transport.is_closing():
            return
        timeout = self.header_timeout_s if phase == "headers" else self.body_timeout_s
        log.info("closed a connection that sent no complete request %s in %g s", phase, timeout)
        self._close()

    def _close(self) -> None:
        self._phase = "closed"
        self._cancel()
        self.transport.close()  # after what is left to write: watched below
        self._watch_writes()

    def _watch_writes(self) -> None:
        """Abort the connection if what waits to be written to the client does
        not shrink for body_timeout_s: a client that stops reading its answers
        holds the app's send (or a closing connection) for ever otherwise."""
        left = self.transport.get_write_buffer_size()
        if self._write_deadline is None and left:
            self._write_deadline = self.loop.call_later(
                self.body_timeout_s, self._check_writes, left
            )

    def _check_writes(self, before: int) -> None:
        self._write_deadline = None
        left = self.transport.get_write_buffer_size()
        if 0 < left < before:
            self._watch_writes()  # the client reads, slowly
        elif left:
            log.info("aborted a connection whose client read nothing in %g s", self.body_timeout_s)
            self._phase = "closed"
            self._cancel()
            self.transport.abort()

    def _make_room(self) -> bool:
        """Close the connection waiting longest for its headers; False if none waits."""
        waiting = [
            c
            for c in self.connections
            if isinstance(c, LimitedHttpProtocol) and c is not self and c._phase == "headers"
        ]
        if not waiting:
            return False
        min(waiting, key=lambda c: c._since)._close()
        return True


def raise_descriptor_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:  # e.g. above the kernel's nr_open: keep the old one
            log.warning("cannot raise the descriptor limit to %d: %s", wanted, exc)
    return soft


def connection_cap(wanted: int, descriptors: int) -> int:
    """`wanted`, lowered so that connections leave RESERVED_FDS descriptors free."""
    room = max(1, descriptors - RESERVED_FDS)
    if wanted > room:
        log.warning(
            "max_connections lowered from %d to %d: the descriptor limit is %d",
            wanted,
            room,
            descriptors,
        )
    return min(wanted, room)


def serving_cap(wanted: int) -> int:
    """The connection cap a server runs with: `wanted`, lowered to leave
    RESERVED_FDS free of the descriptor limit (raised to its maximum first)."""
    return connection_cap(wanted, raise_descriptor_limit())


def backlog(cap: int) -> int:
    """The listen backlog for a connection cap: accepted sockets not yet seen by
    the protocol then stay below about the cap itself."""
    return max(8, min(2048, cap // 4))


class AddressUnavailable(Exception):
    """The server's address cannot be listened on; the message says why and what to do."""


# What the usual errors of bind(2) and listen(2) mean to whoever starts the server.
BIND_ERRORS = {
    errno.EADDRINUSE: "the address is already in use (another server listens there)",
    errno.EACCES: "permission denied (ports below 1024 need root)",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address",
}


def url(host: str, port: int) -> str:
    """The http URL of host:port (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listen(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A TCP socket bound to host:port and listening, for `serve`.

    Raises AddressUnavailable with one line naming the address, the reason
    and how to choose another port.
    """
    where = url(host, port).removeprefix("http://")
    advice = "choose another port with --port N or PLUGHOST_PORT=N"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        problem = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise AddressUnavailable(f"cannot listen on {where}: {problem}") from None
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a restart is not refused for connections in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        problem = BIND_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))
        raise AddressUnavailable(f"cannot listen on {where}: {problem}; {advice}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, saying where it serves once the start-up is done
    (uvicorn says nothing itself when it is given its socket), and stopping
    the jobs still queued as its shutdown begins: their requests are
    answered 503 `shutting_down` at once, not a bare 500 when uvicorn
    cancels what its graceful period did not finish. The analyses still
    running stop waiting `STOP_WAITING_S` into that period and answer 202
    with their job, which goes on until the job service's shutdown."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            base = url(host, port)
            log.info("serving on %s (console %s/console, API docs %s/docs)", base, base, base)

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        services = getattr(self._app.state, "services", None)  # none if the start-up failed
        if services is not None:
            await asyncio.to_thread(services.jobs.stop_starting)
        waits = getattr(self._app.state, "waits", None)
        if waits is not None:
            asyncio.get_running_loop().call_later(STOP_WAITING_S, _end_waits, waits)
        await super().shutdown(sockets=sockets)


def _end_waits(waits: set[asyncio.Future[None]]) -> None:
    """End every analysis's wait as its own deadline would (TimeoutError)."""
    for wait in list(waits):
        if not wait.done():
            wait.set_exception(TimeoutError())


def serve(
    app: FastAPI, settings: Settings, sock: socket.socket | None = None, cap: int | None = None
) -> None:
    """Run the API with uvicorn until it is stopped (SIGINT or SIGTERM), on
    `sock` (from `listen` with `backlog(cap)`; by default listen on the
    settings' address now), with at most `cap` connections (from
    `serving_cap`; by default worked out now).

    Exits with uvicorn's start-up failure status (3) when the start-up fails.
    """
    if cap is None:
        cap = serving_cap(settings.max_connections)
    protocol = LimitedHttpProtocol.configured(
        settings.header_timeout_s, settings.body_timeout_s, cap
    )
    # asyncio accepts up to `backlog` connections per wake-up, and a few
    # wake-ups pass before the first of them reaches the protocol's cap.
    queue = backlog(cap)
    if sock is None:
        sock = listen(settings.host, settings.port, queue)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        loop="uvloop",
        backlog=queue,
        log_config=None,
        timeout_graceful_shutdown=GRACEFUL_S,
    )
    server = _Server(config, app)
    try:
        uvicorn.Server.run(server, sockets=[sock])
    except KeyboardInterrupt:  # a second Ctrl-C during the shutdown, as uvicorn.run allows
        log.info("stopped")
    finally:
        sock.close()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)


__all__ = [
    "AddressUnavailable",
    "LimitedHttpProtocol",
    "connection_cap",
    "listen",
    "raise_descriptor_limit",
    "serve",
    "serving_cap",
]
