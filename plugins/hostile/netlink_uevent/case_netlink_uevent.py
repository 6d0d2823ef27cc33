"""Hostile case: binds a kernel uevent netlink socket.

NETLINK_KOBJECT_UEVENT is not scoped by the network namespace the way
routing is: it carries the machine's device events (disks, USB, network
devices coming and going).
"""

import socket

AF_NETLINK = 16
NETLINK_KOBJECT_UEVENT = 15


class Plugin:
    def run(self, payload):
        # Raises if defended.
        sock = socket.socket(AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
        with sock:
            sock.bind((0, 1))  # any port id, multicast group 1: kernel events
            return {"bound": sock.getsockname()}
