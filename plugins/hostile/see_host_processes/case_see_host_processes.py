"""Hostile case: looks for the host among the processes in /proc.

The suite passes the host's pid and start time; the host is visible only
if /proc shows a process with both (a host in a container can have a pid
the call's own PID namespace has too).
"""

import os


class Plugin:
    def run(self, payload):
        options = payload["options"]
        host, started = options.get("host_pid"), options.get("host_start")
        if not host or started is None:
            raise ValueError("the suite passes host_pid and host_start")
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        if host in pids:
            try:
                with open(f"/proc/{host}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[19]) == started:
                        return {"host_visible": host, "visible_processes": len(pids)}
            except OSError:
                pass
        raise PermissionError("the host's process is not visible")
