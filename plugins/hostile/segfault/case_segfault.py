"""Hostile case: dereferences NULL."""

import ctypes


class Plugin:
    def run(self, payload):
        ctypes.string_at(0)
