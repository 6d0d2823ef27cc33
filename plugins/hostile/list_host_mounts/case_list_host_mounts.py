"""Hostile case: reads /proc/self/mountinfo for the host's mounts (service
runtime directories, control groups, devices), which map the host. Mounts on
the way to what the call may use (its interpreter, packages, own directory,
devices, /proc, scratch) are its own; any other is the host's."""

import os
import sys

OWN = ["/usr", "/etc/ld.so.cache", "/proc", "/tmp/work", "/sys/devices/system/cpu"]
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


class Plugin:
    def run(self, payload):
        own = [*OWN, *DEVICES, os.path.dirname(os.path.abspath(__file__)), *filter(None, sys.path)]
        with open("/proc/self/mountinfo") as stream:
            points = [line.split()[4] for line in stream]
        host = [
            point
            for point in points
            if not any(
                point == path
                or path.startswith(point.rstrip("/") + "/")
                or point.startswith(path + "/")
                for path in own
            )
        ]
        if not host:
            raise PermissionError("only the call's own mounts are visible")
        return {"host_mounts": host[:20]}
