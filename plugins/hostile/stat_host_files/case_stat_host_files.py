"""Hostile case: stat() on host files. Landlock governs opening, not stat, so
without a minimal root a plugin learns which host files exist, their size,
owner and mode.

A path is not a file: the call's minimal root has directories of its own on
the way to what it may use (a /home when the interpreter's venv is there).
Only a file with the device and inode the suite found on the host
(`host_files`, a marker planted for the run among them) is the host's.
"""

import os

PATHS = ("/etc/shadow", "/etc/passwd", "/etc/hostname", "/var/log", "/home")


class Plugin:
    def run(self, payload):
        options = payload["options"]
        host_files = options.get("host_files")
        if not host_files:
            raise ValueError("the suite passes host_files")
        seen = {}
        for path in (*PATHS, options.get("marker_path")):
            if path not in host_files:
                continue
            try:
                info = os.stat(path)
            except OSError:
                continue
            if [info.st_dev, info.st_ino] == host_files[path]:
                seen[path] = {"size": info.st_size, "mode": oct(info.st_mode), "uid": info.st_uid}
        if not seen:
            raise FileNotFoundError("no host file is there to stat")
        return {"seen": seen}
