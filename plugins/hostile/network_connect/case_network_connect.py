"""Hostile case: opens a TCP connection to a server listening on the host's
127.0.0.1. The suite's listener sends a nonce: a server of the sandbox's own
loopback at that port would not know it."""

import socket


class Plugin:
    def run(self, payload):
        options = payload["options"]
        port, nonce = options.get("listener_port"), options.get("listener_nonce")
        if not port or not nonce:
            raise ValueError("the suite passes listener_port and listener_nonce")
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            heard = sock.recv(len(nonce))
        if heard.decode(errors="replace") != nonce:
            raise ConnectionRefusedError(f"port {port} is not the host's listener")
        return {"connected": port}
