"""Hostile case: hangs while being imported."""

while True:
    pass


class Plugin:
    def run(self, payload):
        return {}
