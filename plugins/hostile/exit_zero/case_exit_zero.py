"""Hostile case: exits with code 0 without a reply."""

import os


class Plugin:
    def run(self, payload):
        os._exit(0)
