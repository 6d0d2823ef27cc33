"""Hostile case: returns NaN."""


class Plugin:
    def run(self, payload):
        return {"value": float("nan")}
