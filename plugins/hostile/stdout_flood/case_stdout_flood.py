"""Hostile case: prints without end."""

import sys


class Plugin:
    def run(self, payload):
        while True:
            sys.stdout.write("y" * 65536)
