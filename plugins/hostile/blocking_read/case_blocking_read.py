"""Hostile case: blocks on a read that never completes."""

import os


class Plugin:
    def run(self, payload):
        r, w = os.pipe()
        os.read(r, 1)
