"""Hostile case: exits with code 3 without a reply."""

import os


class Plugin:
    def run(self, payload):
        os._exit(3)
