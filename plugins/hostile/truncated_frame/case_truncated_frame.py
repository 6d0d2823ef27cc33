"""Hostile case: writes half a frame and exits."""

import os


class Plugin:
    def run(self, payload):
        os.write(3, b'\x00\x00\x01\x00{"type"')
        os._exit(0)
