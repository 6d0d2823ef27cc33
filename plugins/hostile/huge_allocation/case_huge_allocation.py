"""Hostile case: allocates 2 GB at once."""


class Plugin:
    def run(self, payload):
        block = bytearray(2 * 1024**3)
        return {"size": len(block)}
