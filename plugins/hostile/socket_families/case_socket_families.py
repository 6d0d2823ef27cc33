"""Hostile case: tries a socket of every address family but unix, IPv4 and IPv6.

Whatever this kernel offers beyond those three (vsock, netlink, packet, xdp,
bluetooth, alg, ...) is kernel attack surface or a way out of the network
namespace; none may open.
"""

import socket

ALLOWED = {socket.AF_UNIX, socket.AF_INET, socket.AF_INET6}
AF_MAX = 46
TYPES = (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW, socket.SOCK_SEQPACKET)


class Plugin:
    def run(self, payload):
        opened = []
        refused = {}
        for family in range(AF_MAX):
            if family in ALLOWED:
                continue
            for kind in TYPES:
                try:
                    socket.socket(family, kind, 0).close()
                except OSError as exc:
                    refused[family] = exc.strerror
                    continue
                opened.append(family)
                break
        if opened:
            return {"opened_families": opened}
        raise PermissionError(f"no family opened: {sorted(set(refused.values()))}")
