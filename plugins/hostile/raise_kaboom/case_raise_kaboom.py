"""Hostile case: raises RuntimeError('kaboom')."""


class Plugin:
    def run(self, payload):
        raise RuntimeError("kaboom")
