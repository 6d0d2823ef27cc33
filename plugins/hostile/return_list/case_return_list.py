"""Hostile case: returns a list."""


class Plugin:
    def run(self, payload):
        return [1, 2, 3]
