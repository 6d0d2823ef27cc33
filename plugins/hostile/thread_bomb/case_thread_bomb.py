"""Hostile case: starts threads until something stops it."""

import threading
import time


class Plugin:
    def run(self, payload):
        threads = []
        while True:
            thread = threading.Thread(target=time.sleep, args=(3600,), daemon=True)
            thread.start()
            threads.append(thread)
