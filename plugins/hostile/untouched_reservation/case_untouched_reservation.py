"""Hostile case: reserves 8 GB it never touches."""

import mmap


class Plugin:
    def run(self, payload):
        area = mmap.mmap(-1, 8 * 1024**3)
        return {"reserved": len(area)}
