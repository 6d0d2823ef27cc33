"""Hostile case: opens a TCP connection to a server listening on the host's 127.0.0.1."""

import socket


class Plugin:
    def run(self, payload):
        port = payload["options"].get("listener_port")
        if not port:
            raise ValueError("the suite passes listener_port")
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return {"connected": port}
