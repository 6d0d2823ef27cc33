"""Hostile case: lists and reads the host's working directory, where a job
store or configuration may live. The suite passes it as host_cwd."""

import os


class Plugin:
    def run(self, payload):
        cwd = payload["options"].get("host_cwd")
        if not cwd:
            raise ValueError("the suite passes host_cwd")
        names = sorted(os.listdir(cwd))
        return {"host_cwd": cwd, "entries": names[:20]}
