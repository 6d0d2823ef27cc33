"""Compatibility: shared memory and a lock between two processes of a call."""

import multiprocessing
from multiprocessing import shared_memory

MESSAGE = b"written by another process"


def fill(name, lock):
    other = shared_memory.SharedMemory(name=name)
    with lock:
        other.buf[: len(MESSAGE)] = MESSAGE
    other.close()


class Plugin:
    def run(self, payload):
        context = multiprocessing.get_context("fork")
        lock = context.Lock()  # a POSIX semaphore in /dev/shm
        shm = shared_memory.SharedMemory(create=True, size=1 << 20)
        try:
            worker = context.Process(target=fill, args=(shm.name, lock))
            worker.start()
            worker.join(10)
            with lock:
                seen = bytes(shm.buf[: len(MESSAGE)]).decode()
        finally:
            shm.close()
            shm.unlink()
        return {"seen": seen, "exit_code": worker.exitcode}
