"""Hostile case: reads /proc/<host pid>/environ."""

import os


def parent_of(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    return 0


class Plugin:
    def run(self, payload):
        host = payload["options"].get("host_pid") or parent_of(os.getppid())
        with open(f"/proc/{host}/environ", "rb") as environ:
            return {"environ": environ.read().decode("latin-1")}
