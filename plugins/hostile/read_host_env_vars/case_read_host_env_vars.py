"""Hostile case: looks for the host's environment variables in its own environment."""

import os


class Plugin:
    def run(self, payload):
        leaked = sorted(set(os.environ) - {"PATH", "LANG", "HOME", "TMPDIR"})
        if leaked:
            return {"leaked": leaked}
        raise PermissionError("no host environment variable is visible")
