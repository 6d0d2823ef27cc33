"""Hostile case: returns an 8 MB result."""


class Plugin:
    def run(self, payload):
        return {"blob": "x" * (8 * 1024 * 1024)}
