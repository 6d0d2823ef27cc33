"""Hostile case: writes a frame the protocol does not allow."""

import os


class Plugin:
    def run(self, payload):
        os.write(3, b"\x00\x00\x00\x02{}")
        return {"ok": True}
