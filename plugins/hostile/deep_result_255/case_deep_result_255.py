"""Hostile case: a result nested 255 levels deep.

Python's encoder in the child sends it (deep_nesting covers 100,000 levels,
which the child refuses itself), the host once stored it, and every job
route showing it answered 500 from then on: pydantic gives up near 255
levels. The case writes its own frame on the reply pipe (fd 3, 4-byte
big-endian length, then JSON), so the host's depth check is what is tested.
"""

import os
import struct


class Plugin:
    def run(self, payload):
        body = b'{"type":"result","result":' + b'{"a":' * 254 + b"{}" + b"}" * 254 + b"}"
        os.write(3, struct.pack(">I", len(body)) + body)
        os._exit(0)
