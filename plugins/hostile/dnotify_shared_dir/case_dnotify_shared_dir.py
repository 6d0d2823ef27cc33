"""Hostile case: watches the shared standard library directory with dnotify.

fcntl(F_NOTIFY) is the older inotify: a signal for every file another,
concurrent call opens in the directory.
"""

import fcntl
import os


class Plugin:
    def run(self, payload):
        shared = os.open(os.path.dirname(os.__file__), os.O_RDONLY | os.O_DIRECTORY)
        try:
            # Raises if defended.
            fcntl.fcntl(shared, fcntl.F_NOTIFY, fcntl.DN_ACCESS | fcntl.DN_MULTISHOT)
            return {"watching": os.path.dirname(os.__file__)}
        finally:
            os.close(shared)
