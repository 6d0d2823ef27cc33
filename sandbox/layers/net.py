"""Layer network_namespace: the call's own network stack, loopback only.

Detected: a child can unshare CLONE_NEWNET. Host: nothing.
Child: the flag joins the minimal root's unshare (`sandbox.layers.mnt`);
then `loopback_up`, so a plugin can still talk to itself on 127.0.0.1.
A call in its uid's slot (`sandbox.layers.shared`) joins the slot's network
namespace instead, where it opens no IP socket at all.
"""

from __future__ import annotations

import fcntl
import socket
import struct

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up() -> None:
    """Bring `lo` up in a fresh network namespace: the only interface there is."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
