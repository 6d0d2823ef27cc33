"""Hostile case: takes a POSIX record lock on a read-only file every call shares.

A read lock needs only a read-only descriptor, and another call sees it with
F_GETLK: the same channel between concurrent calls as flock.
"""

import fcntl
import os


class Plugin:
    def run(self, payload):
        with open(os.__file__, "rb") as shared:
            fcntl.lockf(shared, fcntl.LOCK_SH | fcntl.LOCK_NB)  # raises if defended
            return {"locked": os.__file__}
