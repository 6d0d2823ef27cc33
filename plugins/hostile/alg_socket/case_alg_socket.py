"""Hostile case: opens an AF_ALG socket, the kernel's crypto API for user space."""

import socket

AF_ALG = 38


class Plugin:
    def run(self, payload):
        with socket.socket(AF_ALG, socket.SOCK_SEQPACKET, 0) as sock:  # raises if defended
            reached = ["socket"]
            try:
                sock.bind(("hash", "sha256"))
                reached.append("bound hash/sha256")
            except OSError as exc:
                reached.append(f"bind: {exc}")
            return {"reached": reached}
