"""Hostile case: reads /proc/self/mountinfo for the host's mounts (service
runtime directories, control groups, devices), which map the host. Mounts on
the way to what the call may use (its interpreter, packages, own directory,
devices, /proc, scratch) are its own; any other is the host's if the host
has it too: the same device, root and mount point (mountinfo's fields 3-5)
as one of the suite's `host_mounts`. A mount the call made for itself is
on another device, or somewhere the host has none."""

import os
import sys

OWN = ["/usr", "/etc/ld.so.cache", "/proc", "/tmp/work", "/sys/devices/system/cpu"]
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


class Plugin:
    def run(self, payload):
        hosts = payload["options"].get("host_mounts")
        if not hosts:
            raise ValueError("the suite passes host_mounts")
        hosts = set(hosts)
        own = [*OWN, *DEVICES, os.path.dirname(os.path.abspath(__file__)), *filter(None, sys.path)]
        with open("/proc/self/mountinfo") as stream:
            mounts = [line.split()[2:5] for line in stream]
        host = [
            point
            for device, root, point in mounts
            if f"{device} {root} {point}" in hosts
            and not any(
                point == path
                or path.startswith(point.rstrip("/") + "/")
                or point.startswith(path + "/")
                for path in own
            )
        ]
        if not host:
            raise PermissionError("only the call's own mounts are visible")
        return {"host_mounts": host[:20]}
