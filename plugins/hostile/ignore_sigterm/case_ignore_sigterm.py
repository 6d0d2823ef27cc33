"""Hostile case: ignores SIGTERM and SIGINT, then sleeps."""

import signal
import time


class Plugin:
    def run(self, payload):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        time.sleep(3600)
