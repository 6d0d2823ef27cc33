"""Hostile case: tries to write outside its scratch directory. A write counts
only where the directory is the host's: the device and inode the suite
found there (`host_files`); the call's own tmpfs root has a /tmp too."""

import os


class Plugin:
    def run(self, payload):
        host_files = payload["options"].get("host_files")
        if not host_files:
            raise ValueError("the suite passes host_files")
        here = os.path.dirname(os.path.abspath(__file__))
        written = []
        for target in (
            "/tmp/plughost-escape",
            "/var/tmp/plughost-escape",
            "/dev/shm/plughost-escape",
            os.path.join(here, "escape"),
            "/root/plughost-escape",
            "/plughost-escape",
        ):
            try:
                with open(target, "w") as f:
                    f.write("x")
                    info = os.stat(os.path.dirname(target))
            except OSError:
                continue
            if [info.st_dev, info.st_ino] == host_files.get(os.path.dirname(target)):
                written.append(target)
        if written:
            return {"written": written}
        raise PermissionError("nothing outside the scratch directory is writable")
