"""Compatibility: a process pool, as image plugins split work over processes."""

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor


class Plugin:
    def run(self, payload):
        with multiprocessing.Pool(2) as pool:
            squares = pool.starmap(pow, [(2, 2), (3, 2), (4, 2)])
            workers = set(pool.starmap(os.getpid, [()] * 8)) - {os.getpid()}
        with ProcessPoolExecutor(2) as executor:
            cubes = list(executor.map(pow, [2, 3], [3, 3]))
        return {"pool": squares, "executor": cubes, "other_processes": bool(workers)}
