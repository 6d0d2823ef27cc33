"""Hostile case: starts a setsid grandchild, then sleeps."""

import subprocess
import time


class Plugin:
    def run(self, payload):
        subprocess.Popen(["setsid", "sleep", "600"])
        time.sleep(3600)
