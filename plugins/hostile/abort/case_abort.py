"""Hostile case: calls abort()."""

import os


class Plugin:
    def run(self, payload):
        os.abort()
