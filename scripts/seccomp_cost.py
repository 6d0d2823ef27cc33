#!/usr/bin/env python3
"""What installing the seccomp filter costs a child: the hand-assembled BPF
of `sandbox.layers.seccomp`, the same filter finding the system call by a
chain of comparisons instead of its binary search, and libseccomp through
`pyseccomp`.

    .venv/bin/python scripts/seccomp_cost.py             # our filter, both ways
    pip install pyseccomp; .venv/bin/python scripts/seccomp_cost.py --libseccomp

Each figure is the median over forked children of NO_NEW_PRIVS plus building
and loading the filter, as a sandbox child does. With --libseccomp the same
denials are expressed as libseccomp rules (by name, so its numbers follow
the machine's architecture), once with `pyseccomp` imported in the parent
(as the launcher would) and once imported in each child. Root only.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox.layers import seccomp  # noqa: E402
from sandbox.layers.kernel import PR_SET_NO_NEW_PRIVS, prctl  # noqa: E402

AF_MAX = 46  # families from here on are refused too


def _libseccomp_filter() -> None:
    sc: Any = importlib.import_module("pyseccomp")
    denied = {**seccomp.DENIED_X86_64, **seccomp.DENIED_SHARED_FILES_X86_64}
    rules = sc.SyscallFilter(defaction=sc.ALLOW)
    for reason in denied.values():
        try:
            rules.add_rule(sc.ERRNO(errno.EPERM), reason.split(":")[0])
        except (RuntimeError, ValueError, OSError):
            continue  # not a system call of this architecture
    rules.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    namespaces = seccomp.CLONE_NAMESPACES
    rules.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, namespaces, namespaces))
    for call in ("socket", "socketpair"):
        for family in seccomp.DENIED_SOCKET_FAMILIES:
            rules.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), call, sc.Arg(0, sc.EQ, family))
        rules.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), call, sc.Arg(0, sc.GE, AF_MAX))
    for command in seccomp.DENIED_FCNTL_COMMANDS:
        rules.add_rule(sc.ERRNO(errno.EPERM), "fcntl", sc.Arg(1, sc.EQ, command))
    rules.load()


def _chain(calls: list[tuple[int, str]], otherwise: str, _names: Any) -> list[Any]:
    """One comparison per system call number, in order (no search)."""
    return [
        seccomp._op(
            seccomp.BPF_JEQ_K, number, label, otherwise if index == len(calls) - 1 else None
        )
        for index, (number, label) in enumerate(calls)
    ]


def _in_child(install: Callable[[], None]) -> float:
    """Milliseconds a forked child takes to install a filter with `install`."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        started = time.perf_counter()
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        install()
        os.write(write_end, repr(time.perf_counter() - started).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        data = stream.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the child failed to install the filter (status {status})")
    return float(data) * 1000


def _report(name: str, install: Callable[[], None], runs: int) -> None:
    times = [_in_child(install) for _ in range(runs)]
    print(f"{name}: median {statistics.median(times):.2f} ms, max {max(times):.2f} ms (n={runs})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libseccomp", action="store_true", help="also measure pyseccomp")
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    searched = seccomp.seccomp_program(ipc=False, ip=False)
    chained = seccomp.program_with(_chain, ipc=False, ip=False)
    for name, code in (("binary search", searched), ("chain of comparisons", chained)):
        label = f"hand-assembled BPF, {name} ({len(code) // 8} instructions)"
        _report(label, lambda code=code: seccomp.install_filter(code), args.runs)
    if args.libseccomp:
        _report("libseccomp, imported in each child", _libseccomp_filter, args.runs)
        importlib.import_module("pyseccomp")
        _report("libseccomp, imported once before the fork", _libseccomp_filter, args.runs)


if __name__ == "__main__":
    main()
