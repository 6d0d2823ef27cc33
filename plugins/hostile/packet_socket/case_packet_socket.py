"""Hostile case: opens an AF_PACKET socket (raw link-layer frames)."""

import socket

AF_PACKET = 17
ETH_P_ALL = 0x0003


class Plugin:
    def run(self, payload):
        # Raises if defended.
        with socket.socket(AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)):
            return {"opened": "AF_PACKET"}
