"""Hostile case: fills unix socket buffers, raised to the system's maximum,
over four processes.

What a socket holds is kernel memory: in no process's RSS or address space.
With buffers raised to net.core.wmem_max (4 MiB on many machines) and 25
socket pairs per process, four processes hold over a gigabyte at a 128 MB
limit (a tester held 1.6 GB on a host without a memory cgroup; a cgroup v2
limit does not count a unix socket's buffers either). A host either counts
the buffers (memory_limit) or keeps them at the default size (the plugin
raises when it may not raise them).
"""

import os
import socket
import time

PAIRS, PROCESSES, WANTED = 25, 4, 4 << 20


def hold() -> int:
    held, block, pairs = 0, b"s" * 65536, []
    for _ in range(PAIRS):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (a, b):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WANTED)  # raises if refused
            end.setblocking(False)
        pairs.append((a, b))
        for end in (a, b):
            try:
                while True:
                    held += end.send(block)
            except BlockingIOError:
                pass
    return held >> 20


class Plugin:
    def run(self, payload):
        reports = []
        for _ in range(PROCESSES - 1):
            read, write = os.pipe()
            if os.fork() == 0:  # never returns: the reply is the first process's
                try:
                    os.close(read)
                    os.write(write, str(hold()).encode())
                    os.close(write)
                    while True:  # hold it until the host ends the call
                        time.sleep(60)
                finally:
                    os._exit(1)
            os.close(write)
            reports.append(read)
        held = hold()
        for fd in reports:
            held += int(os.read(fd, 32) or b"0")
        time.sleep(2)  # held for a while, where the host could see it
        return {"held_mb": held}
