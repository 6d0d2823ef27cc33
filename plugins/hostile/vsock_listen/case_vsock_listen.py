"""Hostile case: listens on a VM-wide AF_VSOCK port.

vsock ports belong to the whole virtual machine, not to a network namespace:
a plugin bound there is reachable from the hypervisor and can see the host's
own vsock ports (EADDRINUSE). Creating the socket is what the seccomp filter
denies, so a socket that opens at all counts as broken containment.
"""

import socket

AF_VSOCK = 40
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_PORT_ANY = 0xFFFFFFFF


class Plugin:
    def run(self, payload):
        sock = socket.socket(AF_VSOCK, socket.SOCK_STREAM)  # raises if defended
        with sock:
            reached = ["socket"]
            try:
                sock.bind((VMADDR_CID_ANY, VMADDR_PORT_ANY))
                sock.listen(1)
                reached.append(f"listening on port {sock.getsockname()[1]}")
            except OSError as exc:
                reached.append(f"bind/listen: {exc}")
            return {"reached": reached}
