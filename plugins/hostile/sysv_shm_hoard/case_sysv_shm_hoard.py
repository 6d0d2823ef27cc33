"""Hostile case: fills System V shared memory segments and detaches them.

A detached segment's pages belong to no process: not in any RSS, not in
any address space, yet held until the IPC namespace goes. A hundred
segments of 16 MB hold 1.6 GB at a 128 MB limit. A host either counts the
pages (memory_limit) or refuses the segments (the plugin raises).
"""

import ctypes
import os

IPC_PRIVATE, IPC_CREAT = 0, 0o1000
SEGMENTS, SEGMENT_MB = 100, 16

libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]


class Plugin:
    def run(self, payload):
        size = SEGMENT_MB << 20
        for _ in range(SEGMENTS):
            segment = libc.shmget(IPC_PRIVATE, ctypes.c_size_t(size), IPC_CREAT | 0o600)
            if segment < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            address = libc.shmat(segment, None, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            ctypes.memset(address, 0x5A, size)  # the pages exist now
            libc.shmdt(ctypes.c_void_p(address))
        return {"held_mb": SEGMENTS * SEGMENT_MB}
