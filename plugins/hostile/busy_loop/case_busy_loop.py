"""Hostile case: spins the CPU forever."""


class Plugin:
    def run(self, payload):
        while True:
            pass
