"""Hostile case: opens descriptors until none is left."""

import os


class Plugin:
    def run(self, payload):
        fds = []
        while True:
            fds.append(os.open("/dev/null", os.O_RDONLY))
