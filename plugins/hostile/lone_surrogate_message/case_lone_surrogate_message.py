"""Hostile case: an error reply whose message, exception type and traceback
hold lone surrogates.

The envelope built from it made /v1/analyze answer 500. The case writes
its own frame on the reply pipe (fd 3, 4-byte big-endian length, then
JSON), so the host's handling is tested, whatever the child would send.
"""

import os
import struct


class Plugin:
    def run(self, payload):
        body = (
            b'{"type":"error","reason":"plugin_raised","message":"kaboom \\udc80",'
            b'"exc_type":"Err\\ud800","traceback":"\\udfff"}'
        )
        os.write(3, struct.pack(">I", len(body)) + body)
        os._exit(0)
