"""Hostile case: calls modify_ldt, the x86 local descriptor table.

No Python program needs it; it has been the starting point of kernel
exploits (and of 16-bit segment tricks).
"""

import ctypes

SYS_MODIFY_LDT = 154


class Plugin:
    def run(self, payload):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        buffer = ctypes.create_string_buffer(64)
        result = libc.syscall(SYS_MODIFY_LDT, 0, buffer, ctypes.c_ulong(64))  # func 0: read
        if result < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"modify_ldt refused: errno {errno}")
        return {"modify_ldt": result}
