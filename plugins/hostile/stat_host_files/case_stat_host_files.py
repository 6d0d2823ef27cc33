"""Hostile case: stat() on host files. Landlock governs opening, not stat, so
without a minimal root a plugin learns which host files exist, their size,
owner and mode."""

import os


class Plugin:
    def run(self, payload):
        seen = {}
        for path in ("/etc/shadow", "/etc/passwd", "/etc/hostname", "/var/log", "/home"):
            try:
                info = os.stat(path)
            except FileNotFoundError:
                continue
            seen[path] = {"size": info.st_size, "mode": oct(info.st_mode), "uid": info.st_uid}
        if not seen:
            raise FileNotFoundError("no host file is there to stat")
        return {"seen": seen}
