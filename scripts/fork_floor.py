#!/usr/bin/env python3
"""The bare way of making a call: os.fork and a pipe from a small parent.

    .venv/bin/python scripts/fork_floor.py serial 2000
    .venv/bin/python scripts/fork_floor.py sustained 5 4
    .venv/bin/python scripts/fork_floor.py serial 2000 DIR MODULE:CLASS
    .venv/bin/python scripts/fork_floor.py warm 2000

The floor every ratio of `scripts/bench.py` and `scripts/phases.py` is
taken against. Run as a script, it is that parent: a fresh interpreter that
imports only what a call needs (json, os, resource), so a child pays no
after-fork hook of a module the bare call does not have (threading's is
about 90 faults a call). `serial N` times N calls one after the other
(milliseconds each); `sustained S T` counts calls per second from T threads
for S seconds (threading imported for that alone). Either prints, as JSON,
its figures with the cost of its calls: the CPU and minor page faults of the
parent (every thread) and of the children it reaped.

`serial N DIR MODULE:CLASS` is the same bare call whose child also imports
a plugin from DIR (its compiled bytecode, as a call's child reads it), makes
its object and runs it, and sends the result: the least any design can cost
that keeps what a call is promised (a fresh process per call, the plugin
imported in it), with no isolation at all. Nothing of the plugin is loaded
in the parent.

`warm N` times the round trip of a call whose child was forked before it:
the child decodes and encodes once, says it is ready and blocks on a pipe;
the parent writes a small JSON request and reads the child's JSON reply
(the clock runs from the write to the reply). The bare form of a prewarmed
call.
"""

from __future__ import annotations

import json
import os
import resource
import sys


def once(plugin: tuple[str, str] | None = None) -> object:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        reply = {"value": 1} if plugin is None else _import_and_run(*plugin)
        os.write(w, json.dumps(reply).encode())
        os._exit(0)
    os.close(w)
    data = os.read(r, 1024)
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def _import_and_run(directory: str, entrypoint: str) -> object:
    """In a child: the plugin's import, its object, one run, its result framed."""
    import importlib  # loaded by the parent before its first fork (`serial`)

    sys.path.insert(0, directory)
    module, _, name = entrypoint.partition(":")
    plugin = getattr(importlib.import_module(module), name)()
    payload = {"image": b"", "mime_type": "image/png", "options": {}}
    return {"type": "result", "result": plugin.run(payload)}


def warm_once() -> float:
    """One call to a child forked before it; milliseconds from request to reply."""
    from time import perf_counter, sleep

    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(req_w)
        os.close(rep_r)
        # Its decoding and encoding run once before it says it is ready: a
        # first use in a forked process copies every page it writes.
        json.dumps({"type": "result", "result": json.loads(b'{"value": 0}')})
        os.write(rep_w, b"r")  # ready: blocked on its request from here
        request = json.loads(os.read(req_r, 1024))
        os.write(rep_w, json.dumps({"type": "result", "result": request}).encode())
        os._exit(0)
    os.close(req_r)
    os.close(rep_w)
    os.read(rep_r, 1)
    # As a host that did not fork it: the parent's own pages written after the
    # fork are copied before the clock starts, and the child is blocked.
    json.loads(b'{"value": 1}')
    sleep(0.001)
    started = perf_counter()
    os.write(req_w, b'{"value": 1}')
    json.loads(os.read(rep_r, 1024))
    elapsed = (perf_counter() - started) * 1000
    os.close(req_w)
    os.close(rep_r)
    os.waitpid(pid, 0)
    return elapsed


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


def serial(n: int, plugin: tuple[str, str] | None = None) -> dict[str, object]:
    from time import perf_counter  # a builtin module: nothing runs after a fork

    if plugin is not None:
        import importlib  # noqa: F401 - the child's, loaded once here

    for _ in range(5):
        once(plugin)
    out, before = [], usage()
    for _ in range(n):
        started = perf_counter()
        once(plugin)
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
    if sys.argv[1] == "warm":
        print(json.dumps({"samples": [warm_once() for _ in range(int(sys.argv[2]))]}))
    elif sys.argv[1] == "serial":
        plugin = (sys.argv[3], sys.argv[4]) if len(sys.argv) > 4 else None
        print(json.dumps(serial(int(sys.argv[2]), plugin)))
    else:
        print(json.dumps(sustained(float(sys.argv[2]), int(sys.argv[3]))))
