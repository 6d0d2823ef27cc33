"""Compatibility: fifteen threads at once at 128 MB, and a default thread pool
(sized by os.cpu_count(), which is the call's CPUs)."""

import threading
from concurrent.futures import ThreadPoolExecutor


class Plugin:
    def run(self, payload):
        barrier = threading.Barrier(16, timeout=20)
        done = []

        def work(index):
            barrier.wait()  # every thread exists at this point
            done.append(sum(range(100_000)) + index)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(15)]
        for thread in threads:
            thread.start()
        barrier.wait()
        for thread in threads:
            thread.join()
        with ThreadPoolExecutor() as executor:
            squares = list(executor.map(lambda n: n * n, range(6)))
        return {"threads": len(done), "executor": squares}
