"""Hostile case: every process of a call is forked from the launcher, so its
command line (/proc/<pid>/cmdline) is the launcher's, naming the host's
source directory. Reads its own, its parent's and pid 1's."""

import os


class Plugin:
    def run(self, payload):
        found = {}
        for pid in ("self", str(os.getppid()), "1"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as stream:
                    line = stream.read().replace(b"\0", b" ").strip()
            except OSError:
                continue
            if line:
                found[pid] = line.decode(errors="replace")[:300]
        if not found:
            raise PermissionError("no command line to read")
        return {"cmdlines": found}
