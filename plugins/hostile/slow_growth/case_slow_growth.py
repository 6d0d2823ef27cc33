"""Hostile case: grows by 4 MB steps until stopped."""

class Plugin:
    def run(self, payload):
        chunks = []
        while True:
            chunks.append(b'x' * (4 * 1024 * 1024))
