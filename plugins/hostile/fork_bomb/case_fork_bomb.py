"""Hostile case: forks until the process cap stops it."""

import os
import time


class Plugin:
    def run(self, payload):
        pids = []
        while True:
            pid = os.fork()
            if pid == 0:
                time.sleep(3600)
                os._exit(0)
            pids.append(pid)
