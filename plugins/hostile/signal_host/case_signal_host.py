"""Hostile case: finds the host's pid and checks it may signal it."""

import os


def parent_of(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("PPid:"):
                return int(line.split()[1])


class Plugin:
    def run(self, payload):
        host = parent_of(os.getppid())
        os.kill(host, 0)
        return {"signalled": host}
