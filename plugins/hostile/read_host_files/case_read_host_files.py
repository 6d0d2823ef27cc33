"""Hostile case: reads world-readable host files (no permission bit stops it).

Only a file with the device and inode the suite found on the host counts
(`host_files`); the marker it planted for the run must also hold the
nonce no sandbox can know.
"""

import os

PATHS = ("/etc/passwd", "/etc/hostname", "/etc/hosts")


class Plugin:
    def run(self, payload):
        options = payload["options"]
        host_files, marker = options.get("host_files"), options.get("marker_path")
        if not host_files or not marker:
            raise ValueError("the suite passes host_files and marker_path")
        read = {}
        for path in (*PATHS, marker):
            if path not in host_files:
                continue
            try:
                with open(path, "rb") as stream:
                    info = os.fstat(stream.fileno())
                    text = stream.read(200).decode("latin-1")
            except OSError:
                continue
            if [info.st_dev, info.st_ino] != host_files[path]:
                continue  # a file of the sandbox's own at that path
            if path != marker or text == options.get("marker_nonce"):
                read[path] = text
        if read:
            return {"read": read}
        raise PermissionError("no host file outside the allowed paths is readable")
