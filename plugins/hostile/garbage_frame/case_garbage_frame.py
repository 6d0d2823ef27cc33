"""Hostile case: writes a frame that is not JSON on the reply pipe."""

import os


class Plugin:
    def run(self, payload):
        os.write(3, b"\x00\x00\x00\x05hello")
        return {"ok": True}
