"""Hostile case: reads the host's environment from /proc/<host pid>/environ.

The process is the host only if its start time is the one the suite passes
(a host in a container can run at a pid the call's own PID namespace has
too); both files are read through one /proc/<pid> directory, so they are
of the same process.
"""

import os


class Plugin:
    def run(self, payload):
        options = payload["options"]
        host, started = options.get("host_pid"), options.get("host_start")
        if not host or started is None:
            raise ValueError("the suite passes host_pid and host_start")
        directory = os.open(f"/proc/{host}", os.O_RDONLY | os.O_DIRECTORY)
        try:
            with open(os.open("stat", os.O_RDONLY, dir_fd=directory)) as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[19]) != started:
                    raise ProcessLookupError(f"process {host} here is not the host")
            with open(os.open("environ", os.O_RDONLY, dir_fd=directory), "rb") as environ:
                return {"environ": environ.read().decode("latin-1")}
        finally:
            os.close(directory)
