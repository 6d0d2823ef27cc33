"""Hostile case: sleeps forever."""

import time


class Plugin:
    def run(self, payload):
        time.sleep(3600)
