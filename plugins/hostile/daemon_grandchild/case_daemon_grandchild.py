"""Hostile case: leaves a double-forked daemon behind and returns."""

import os
import time


class Plugin:
    def run(self, payload):
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(600)
            os._exit(0)
        return {"daemonised": True}
