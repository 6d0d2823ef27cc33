"""Hostile case: writes to stderr without end."""

import sys


class Plugin:
    def run(self, payload):
        while True:
            sys.stderr.write("z" * 65536)
