#!/usr/bin/env python3
"""The bare way of making a call: os.fork and a pipe from a small parent.

    .venv/bin/python scripts/fork_floor.py serial 2000
    .venv/bin/python scripts/fork_floor.py sustained 5 4

The floor every ratio of `scripts/bench.py` and `scripts/phases.py` is
taken against. Run as a script, it is that parent: a fresh interpreter that
imports only what a call needs (json, os, resource), so a child pays no
after-fork hook of a module the bare call does not have (threading's is
about 90 faults a call). `serial N` times N calls one after the other
(milliseconds each); `sustained S T` counts calls per second from T threads
for S seconds (threading imported for that alone). Either prints, as JSON,
its figures with the cost of its calls: the CPU and minor page faults of the
parent (every thread) and of the children it reaped.
"""

from __future__ import annotations

import json
import os
import resource
import sys


def once() -> object:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, json.dumps({"value": 1}).encode())
        os._exit(0)
    os.close(w)
    data = os.read(r, 1024)
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def usage() -> list[float]:
    out: list[float] = []
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        u = resource.getrusage(who)
        out += [(u.ru_utime + u.ru_stime) * 1000, u.ru_minflt]
    return out


def cost(before: list[float], calls: int) -> dict[str, float]:
    d = [b - a for a, b in zip(before, usage(), strict=True)]
    return {
        "calls": calls,
        "cpu_ms": (d[0] + d[2]) / calls,
        "faults": (d[1] + d[3]) / calls,
        "parent_cpu_ms": d[0] / calls,
        "parent_faults": d[1] / calls,
        "children_cpu_ms": d[2] / calls,
        "children_faults": d[3] / calls,
    }


def serial(n: int) -> dict[str, object]:
    from time import perf_counter  # a builtin module: nothing runs after a fork

    for _ in range(5):
        once()
    out, before = [], usage()
    for _ in range(n):
        started = perf_counter()
        once()
        out.append((perf_counter() - started) * 1000)
    return {"samples": out, "cost": cost(before, n)}


def sustained(seconds: float, threads: int) -> dict[str, object]:
    import threading
    import time

    count, lock, stop = [0], threading.Lock(), time.monotonic() + seconds

    def loop() -> None:
        while time.monotonic() < stop:
            once()
            with lock:
                count[0] += 1

    before, started = usage(), time.monotonic()
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    rate = count[0] / (time.monotonic() - started)
    return {"rate": rate, "cost": cost(before, count[0])}


def measure(*args: object) -> dict:
    """Run the floor in a fresh interpreter (`serial N` or `sustained S T`)
    and return what it printed."""
    import subprocess

    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


if __name__ == "__main__":
    if sys.argv[1] == "serial":
        print(json.dumps(serial(int(sys.argv[2]))))
    else:
        print(json.dumps(sustained(float(sys.argv[2]), int(sys.argv[3]))))
