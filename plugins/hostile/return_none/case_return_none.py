"""Hostile case: returns None."""


class Plugin:
    def run(self, payload):
        return None
