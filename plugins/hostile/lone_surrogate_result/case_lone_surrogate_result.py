"""Hostile case: a result string holding a lone surrogate ("\\ud800").

JSON can spell it, UTF-8 cannot encode it: stored and served as is, it made
/v1/analyze answer 500. The case writes its own frame on the reply pipe
(fd 3, 4-byte big-endian length, then JSON), so the host's check is what
is tested, whatever the child's encoder would do.
"""

import os
import struct


class Plugin:
    def run(self, payload):
        body = b'{"type":"result","result":{"label":"bad \\ud800 text"}}'
        os.write(3, struct.pack(">I", len(body)) + body)
        os._exit(0)
