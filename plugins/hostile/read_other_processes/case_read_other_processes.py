"""Hostile case: tries to read other processes' environment and working directory."""

import os


class Plugin:
    def run(self, payload):
        me = os.getpid()
        readable = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
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
