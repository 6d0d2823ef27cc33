"""Hostile case: announces a 2 GB frame."""

import os
import time


class Plugin:
    def run(self, payload):
        os.write(3, b"\x7f\xff\xff\xff")
        time.sleep(3600)
