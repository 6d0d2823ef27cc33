"""Hostile case: every process of a call is forked from the launcher, so its
command line (/proc/<pid>/cmdline) is the launcher's, naming the host's
source directory. Reads its own, its parent's and pid 1's. A command line
counts only if it names a host path the suite passes (`host_paths`: the
host's interpreter, its prefix, its code's directory, its working
directory); a process of the call's own with a command line of its own
is no leak."""

import os


class Plugin:
    def run(self, payload):
        host_paths = payload["options"].get("host_paths")
        if not host_paths:
            raise ValueError("the suite passes host_paths")
        found = {}
        for pid in ("self", str(os.getppid()), "1"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as stream:
                    line = stream.read().replace(b"\0", b" ").strip().decode(errors="replace")
            except OSError:
                continue
            if any(path in line for path in host_paths):
                found[pid] = line[:300]
        if not found:
            raise PermissionError("no command line names a host path")
        return {"cmdlines": found}
