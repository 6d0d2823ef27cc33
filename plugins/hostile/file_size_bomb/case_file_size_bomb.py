"""Hostile case: writes one file past the file size limit."""


class Plugin:
    def run(self, payload):
        with open("big", "wb") as f:
            while True:
                f.write(b"x" * (1024 * 1024))
