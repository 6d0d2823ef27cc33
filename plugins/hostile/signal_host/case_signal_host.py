"""Hostile case: signals the host.

The suite passes the host's pid and its start time (field 22 of
/proc/<pid>/stat). A pid alone names no process outside the call's own PID
namespace: a host in a container can run at pid 2, which in the call's
namespace is the call itself. Only a process of that pid *and* that start
time is the host, and only a signal it may send to that one is an escape.
"""

import os


def start_time(pid):
    with open(f"/proc/{pid}/stat") as stream:
        return int(stream.read().rsplit(")", 1)[1].split()[19])


class Plugin:
    def run(self, payload):
        options = payload["options"]
        host, started = options.get("host_pid"), options.get("host_start")
        if not host or started is None:
            raise ValueError("the suite passes host_pid and host_start")
        try:
            same = start_time(host) == started
        except (OSError, ValueError, IndexError) as exc:
            raise ProcessLookupError(f"no process {host} is visible: {exc}") from exc
        if not same:
            raise ProcessLookupError(f"process {host} here is not the host")
        os.kill(host, 0)  # the permission check of a real signal, without the harm
        return {"signalled": host}
