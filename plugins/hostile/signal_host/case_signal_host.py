"""Hostile case: finds the host's pid and checks it may signal it."""

import os


def parent_of(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    return 0


class Plugin:
    def run(self, payload):
        # The crash suite passes the host's pid; otherwise guess it: the
        # launcher's parent.
        host = payload["options"].get("host_pid") or parent_of(os.getppid())
        if host <= 1:
            raise ProcessLookupError("the host's pid is not visible")
        os.kill(host, 0)  # the permission check of a real signal, without the harm
        return {"signalled": host}
