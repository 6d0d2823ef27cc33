"""Hostile case: reads /etc/shadow, and on a root host the root-only marker
the suite planted. Only a file with the device and inode the suite found on
the host counts (a sandbox's own /etc/shadow would not be the host's)."""

import os


class Plugin:
    def run(self, payload):
        options = payload["options"]
        host_files = options.get("host_files")
        if not host_files:
            raise ValueError("the suite passes host_files")
        read, refused = {}, []
        for path in ("/etc/shadow", options.get("root_only_path")):
            if path not in host_files:
                continue
            try:
                with open(path, "rb") as secret:
                    info = os.fstat(secret.fileno())
                    if [info.st_dev, info.st_ino] == host_files[path]:
                        read[path] = len(secret.read())
            except OSError as exc:
                refused.append(f"{path}: {exc.strerror}")
        if not read:
            raise PermissionError(f"no root-only host file is readable ({'; '.join(refused)})")
        return {"secret_bytes": read}
