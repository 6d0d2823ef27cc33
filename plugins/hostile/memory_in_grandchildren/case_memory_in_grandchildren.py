"""Hostile case: spreads 240 MB over four forked processes, each under the per-process limit."""

import os
import time


class Plugin:
    def run(self, payload):
        for _ in range(4):
            if os.fork() == 0:
                block = bytearray(60 * 1024 * 1024)
                for i in range(0, len(block), 4096):
                    block[i] = 1
                time.sleep(3600)
                os._exit(0)
        time.sleep(3600)
