"""Hostile case: returns an object JSON cannot hold."""


class Plugin:
    def run(self, payload):
        return {"value": object()}
