"""Hostile case: prints a little and succeeds."""

import sys


class Plugin:
    def run(self, payload):
        print("hello from the plugin")
        print("a warning", file=sys.stderr)
        return {"ok": True}
