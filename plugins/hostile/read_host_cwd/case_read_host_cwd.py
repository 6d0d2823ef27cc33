"""Hostile case: lists the host's working directory, where a job store or
configuration may live. The suite passes it as host_cwd, with its device
and inode in host_files: the call's minimal root may have an empty
directory of its own at that path (on the way to the plugin's directory),
which is not the host's."""

import os


class Plugin:
    def run(self, payload):
        options = payload["options"]
        cwd = options.get("host_cwd")
        wanted = options.get("host_files", {}).get(cwd)
        if not cwd or not wanted:
            raise ValueError("the suite passes host_cwd and its identity in host_files")
        directory = os.open(cwd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            info = os.fstat(directory)
            if [info.st_dev, info.st_ino] != wanted:
                raise FileNotFoundError(f"{cwd} here is not the host's working directory")
            names = sorted(os.listdir(directory))
        finally:
            os.close(directory)
        return {"host_cwd": cwd, "entries": names[:20]}
