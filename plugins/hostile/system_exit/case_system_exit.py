"""Hostile case: raises SystemExit(4)."""


class Plugin:
    def run(self, payload):
        raise SystemExit(4)
