"""Hostile case: returns a result nested 100,000 deep."""


class Plugin:
    def run(self, payload):
        value = {}
        for _ in range(100000):
            value = {"a": value}
        return value
