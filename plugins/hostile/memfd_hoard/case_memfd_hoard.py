"""Hostile case: holds memory in memfds, written with write(2), over three
processes.

A memfd's pages written with write(2) are in no process's RSS (which a host
without a memory cgroup sums) nor in its address space (RLIMIT_AS). Each
file stays within RLIMIT_FSIZE and each process within RLIMIT_NOFILE; three
processes of 30 files of 16 MB hold 1.4 GB at a 128 MB limit. A host either
counts the pages (memory_limit) or refuses memfd_create (the plugin raises).
"""

import os
import time

FILES, FILE_MB, PROCESSES = 30, 16, 3


def hold() -> int:
    block = b"m" * (1 << 20)
    files = []
    for index in range(FILES):
        fd = os.memfd_create(f"hoard-{index}")
        for _ in range(FILE_MB):
            os.write(fd, block)
        files.append(fd)
    return len(files) * FILE_MB


class Plugin:
    def run(self, payload):
        os.close(os.memfd_create("probe"))  # raises where memfds are refused
        reports = []
        for _ in range(PROCESSES - 1):
            read, write = os.pipe()
            if os.fork() == 0:
                os.close(read)
                os.write(write, str(hold()).encode())
                os.close(write)
                while True:  # hold it until the host ends the call
                    time.sleep(60)
            os.close(write)
            reports.append(read)
        held = hold()
        for fd in reports:
            held += int(os.read(fd, 32) or b"0")
        return {"held_mb": held}
