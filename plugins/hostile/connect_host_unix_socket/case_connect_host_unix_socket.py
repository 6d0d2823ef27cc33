"""Hostile case: connects to a unix socket a host service listens on (path-named,
outside /tmp, as journald, D-Bus or a container runtime would have)."""

import socket


class Plugin:
    def run(self, payload):
        path = payload["options"].get("unix_listener_path")
        if not path:
            raise ValueError("the suite passes unix_listener_path")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(path)
            return {"connected": path}
