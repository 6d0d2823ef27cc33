"""Hostile case: tries to read other processes' environment and working
directory (the host's, other calls' data). A process of the call's own
session (its init, a relay) is the call's, not another's: only a process
of another session counts."""

import os


def session_of(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[3])  # field 6


class Plugin:
    def run(self, payload):
        mine = session_of("self")
        readable = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if session_of(entry) == mine:
                    continue
            except (OSError, ValueError, IndexError):
                continue  # gone, or not shown
            for what in ("environ", "cwd"):
                path = f"/proc/{entry}/{what}"
                try:
                    if what == "cwd":
                        os.listdir(path)
                    else:
                        with open(path, "rb") as f:
                            f.read(1)
                    readable.append(path)
                except OSError:
                    pass
        if readable:
            return {"readable": readable[:20]}
        raise PermissionError("no other process data is readable")
