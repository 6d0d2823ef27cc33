"""Hostile case: calls system calls that exploits start from."""

import ctypes
import os

CLONE_NEWUSER = 0x10000000
PTRACE_TRACEME = 0
KEYCTL_GET_KEYRING_ID = 0
KEY_SPEC_SESSION_KEYRING = -3
SYS_KEYCTL = 250


class Plugin:
    def run(self, payload):
        libc = ctypes.CDLL(None, use_errno=True)
        reached = []
        if os.fork() == 0:  # in a child: a new user namespace would stick to us
            os._exit(0 if libc.unshare(CLONE_NEWUSER) == 0 else 1)
        _, status = os.wait()
        if os.waitstatus_to_exitcode(status) == 0:
            reached.append("unshare(CLONE_NEWUSER)")
        if libc.ptrace(PTRACE_TRACEME, 0, 0, 0) == 0:
            reached.append("ptrace(PTRACE_TRACEME)")
        if libc.syscall(SYS_KEYCTL, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0) >= 0:
            reached.append("keyctl")
        if reached:
            return {"reached": reached}
        raise PermissionError("every kernel interface tried was denied")
