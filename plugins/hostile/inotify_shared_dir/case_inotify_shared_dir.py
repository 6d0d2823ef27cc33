"""Hostile case: watches the shared standard library directory with inotify.

Every call reads the same interpreter and package files; a watch on their
directory reports which modules another, concurrent call opens (and so,
for instance, which image format it was sent).
"""

import ctypes
import os

IN_OPEN = 0x00000020
IN_ACCESS = 0x00000001


class Plugin:
    def run(self, payload):
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_CLOEXEC)
        if fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"inotify_init1 refused: {os.strerror(errno)}")
        try:
            shared = os.path.dirname(os.__file__).encode()
            watch = libc.inotify_add_watch(fd, shared, IN_OPEN | IN_ACCESS)
            if watch < 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"inotify_add_watch refused: {os.strerror(errno)}")
            return {"watching": shared.decode()}
        finally:
            os.close(fd)
