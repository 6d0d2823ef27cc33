"""A callback receiver for tests: records every request, and answers by path.

    /ok            200
    /flaky/N       500 to the first N requests of each delivery id, then 200
    /redirect      302 to /target (which records a hit if anything follows it)
    /slow          answers after SLOW_S
    /trickle       a 200 whose headers come one byte every TRICKLE_GAP_S, for TRICKLE_S
    /huge          200 with HUGE_BYTES of body
    GET /_log      the recorded requests as JSON

In this process (`Receiver`), or as a process of its own:
`python -m tests.callback_receiver HOST PORT` (a test in a network namespace).
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SLOW_S = 3.0
TRICKLE_S = 6.0
TRICKLE_GAP_S = 0.1
HUGE_BYTES = 8 * 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        path = self.path
        record = {
            "path": path,
            "headers": dict(self.headers),
            "body": body.decode(),
            "at": time.time(),
        }
        with self.server.lock:
            self.server.records.append(record)
            delivery = self.headers.get("Plughost-Delivery", "")
            self.server.seen[delivery] += 1
            seen = self.server.seen[delivery]
        if path.startswith("/flaky/") and seen <= int(path.rsplit("/", 1)[1]):
            self._answer(500, b"not yet")
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/target")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/slow":
            time.sleep(SLOW_S)
            self._answer(200, b"late")
        elif path == "/trickle":
            self._trickle()
        elif path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(HUGE_BYTES))
            self.end_headers()
            chunk = b"x" * 65536
            try:
                for _ in range(HUGE_BYTES // len(chunk)):
                    self.wfile.write(chunk)
            except OSError:
                self.server.cut_short += 1  # the host stopped reading: what it should do
        else:
            self._answer(200, b"thanks")

    def _trickle(self) -> None:
        """Never idle for a whole read timeout, never done before TRICKLE_S."""
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Trickle: ")
        try:
            for _ in range(int(TRICKLE_S / TRICKLE_GAP_S)):
                self.wfile.write(b"a")
                time.sleep(TRICKLE_GAP_S)
            self.wfile.write(b"\r\nContent-Length: 0\r\n\r\n")
        except OSError:
            self.server.cut_short += 1  # the host hung up: what it should do

    def do_GET(self) -> None:  # noqa: N802
        with self.server.lock:
            data = json.dumps(self.server.records).encode()
        self._answer(200, data)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.lock = threading.Lock()
        self.records: list[dict[str, Any]] = []
        self.seen: Counter[str] = Counter()
        self.cut_short = 0


class Receiver:
    """A receiver in a thread of this process, on `host` and a free port."""

    def __init__(self, host: str = "127.0.0.1", tls: tuple[str, str] | None = None) -> None:
        """`tls`: (certificate, key) files to serve https with."""
        self.server = _Server((host, 0))
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.host = host
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def records(self, path: str | None = None) -> list[dict[str, Any]]:
        with self.server.lock:
            return [r for r in self.server.records if path is None or r["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


if __name__ == "__main__":
    _Server((sys.argv[1], int(sys.argv[2]))).serve_forever()
