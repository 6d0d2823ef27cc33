"""Hostile case: raises KeyboardInterrupt."""


class Plugin:
    def run(self, payload):
        raise KeyboardInterrupt
