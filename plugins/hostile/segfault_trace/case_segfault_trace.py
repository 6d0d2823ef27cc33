"""Hostile case: prints its stack and the files it knows of, turns
faulthandler on and dereferences NULL. Every frame below the plugin's is the
sandbox's own code (the child, the launcher) at its host path, and the
standard library sits at the interpreter's install path: the envelope must
show the plugin's frames and output without any of them."""

import ctypes
import faulthandler
import os
import sys
import traceback


class Plugin:
    def run(self, payload):
        traceback.print_stack()
        print(__file__, os.__file__, sys.executable, file=sys.stderr)
        sys.stderr.flush()
        faulthandler.enable()
        ctypes.string_at(0)
