"""Hostile case: takes an flock on a read-only file every call shares.

flock needs only a descriptor, not write access: two concurrent calls that
lock and probe `os.py` in turn pass bits to each other.
"""

import fcntl
import os


class Plugin:
    def run(self, payload):
        with open(os.__file__, "rb") as shared:
            fcntl.flock(shared, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if defended
            return {"locked": os.__file__}
