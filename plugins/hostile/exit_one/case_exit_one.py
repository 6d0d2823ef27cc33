"""Hostile case: exits with code 1 without a reply."""

import os


class Plugin:
    def run(self, payload):
        os._exit(1)
