"""Hostile case: overflows the C stack through repr of a deep list."""

import sys
class Plugin:
    def run(self, payload):
        sys.setrecursionlimit(10**8)
        nested = []
        for _ in range(10**6):
            nested = [nested]
        return {'text': repr(nested)}
