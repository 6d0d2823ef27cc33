"""Hostile case: sends a result frame whose result is not an object."""

import json
import os
import struct


class Plugin:
    def run(self, payload):
        body = json.dumps({"type": "result", "result": [1, 2]}).encode()
        os.write(3, struct.pack(">I", len(body)) + body)
        os._exit(0)
