"""Hostile case: sends a pickle that would run a command if unpickled."""

import os
import pickle
import struct


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/plughost-pwned",))


class Plugin:
    def run(self, payload):
        body = pickle.dumps(Boom())
        os.write(3, struct.pack(">I", len(body)) + body)
        os._exit(0)
