"""Hostile case: sends a reply of a type the protocol does not have."""

import json
import os
import struct


class Plugin:
    def run(self, payload):
        body = json.dumps({"type": "exec", "cmd": "id"}).encode()
        os.write(3, struct.pack(">I", len(body)) + body)
        os._exit(0)
