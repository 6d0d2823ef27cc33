"""Hostile case: lists the host's processes."""

import os


class Plugin:
    def run(self, payload):
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        if any(pid > 10 for pid in pids) and 1 in pids and len(pids) > 5:
            return {"visible_processes": len(pids)}
        raise PermissionError("host processes are not visible")
