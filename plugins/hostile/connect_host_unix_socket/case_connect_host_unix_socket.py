"""Hostile case: connects to a unix socket a host service listens on (path-named,
outside /tmp, as journald, D-Bus or a container runtime would have). The
suite's listener sends a nonce: a socket of the sandbox's own at that path
would not know it."""

import socket


class Plugin:
    def run(self, payload):
        options = payload["options"]
        path, nonce = options.get("unix_listener_path"), options.get("listener_nonce")
        if not path or not nonce:
            raise ValueError("the suite passes unix_listener_path and listener_nonce")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(path)
            heard = sock.recv(len(nonce))
        if heard.decode(errors="replace") != nonce:
            raise ConnectionRefusedError(f"{path} is not the host's listener")
        return {"connected": path}
