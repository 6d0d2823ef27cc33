#!/usr/bin/env python3
"""Where one isolated call's time goes: wall time, CPU time and page faults per phase.

    .venv/bin/python scripts/phases.py                      # 3 rounds of 100 calls
    .venv/bin/python scripts/phases.py --calls 200 --rounds 3 --prewarm 1
    .venv/bin/python scripts/phases.py --markdown           # the table for docs/performance.md
    .venv/bin/python scripts/phases.py --save after.json    # and keep its summary
    .venv/bin/python scripts/phases.py --compare before.json after.json   # side by side
    .venv/bin/python scripts/phases.py --untraced --calls 500 --rounds 2  # faults, CPU totals

Runs a trivial plugin through `ToolRunner.run`, serially, with the phase
trace on (`sandbox/trace.py`): the host thread, the launcher and every
process of each call append a mark (pid, label, CLOCK_MONOTONIC, the
thread's own CPU clock and minor page faults) where a phase ends. A
phase's row is named by the mark that ends it; its wall time, CPU time and
faults run from the previous mark of the same process (a forked process's
first mark: CPU and faults from its fork, wall from the last mark before
it). Faults (`ru_minflt`: a page first touched, or a page shared with the
fork's parent written and copied) are far steadier than times on a busy
machine. Per call, machine CPU is counted from the
processes themselves, not from the machine's idle time, so other work on
the machine does not inflate it:

    host       the calling thread's CPU from the runner's entry to its return,
               and the closer thread's putting the call away (each call is
               put away, `Sandbox.settle`, before the next starts)
    launcher   the launcher's CPU between the call's request and its reap
    call tree  the rusage of the reaped call (wait4 in the launcher: the child
               with every descendant it waited for)
    exit       the call tree's rusage minus the CPU (and faults) its
               processes marked: their exits, the namespaces' teardown
               charged to them, the relay's wait

Kernel threads' CPU (the network namespace's cleanup runs in a workqueue,
charged to no process of the call) is read from /proc for the whole run and
shown per call beside the machine's busy time from /proc/stat; both include
whatever else the machine ran, so they are context, not part of the table.
Medians per phase do not add up; the share column is each phase's part of
the summed CPU over all calls.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fork_floor  # noqa: E402 (scripts/, beside this one)
from call_path import trivial_plugin  # noqa: E402 (scripts/, beside this one)

from sandbox import trace  # noqa: E402
from sandbox.supervisor import Sandbox  # noqa: E402
from sandbox.tool_runner import ToolRunner  # noqa: E402

TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


@dataclass
class Mark:
    pid: int
    label: str
    mono_ns: int
    cpu_ns: int
    faults: int
    values: tuple[int, ...]


@dataclass
class Call:
    """One call's phases: label -> (wall ms, cpu ms, minor faults), and its totals."""

    phases: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    host_cpu: float = 0.0
    closer_cpu: float = 0.0
    launcher_cpu: float = 0.0
    tree_cpu: float = 0.0
    wall: float = 0.0
    launcher_faults: int = 0
    tree_faults: int = 0  # the reaped call tree's ru_minflt
    host_faults: int = 0  # the calling and the closer thread's

    @property
    def total_cpu(self) -> float:
        return self.host_cpu + self.launcher_cpu + self.tree_cpu


def read_marks(path: str) -> list[Mark]:
    marks = []
    for line in Path(path).read_text().splitlines():
        pid, label, mono, cpu, faults, *values = line.split()
        marks.append(
            Mark(int(pid), label, int(mono), int(cpu), int(faults), tuple(map(int, values)))
        )
    return sorted(marks, key=lambda m: m.mono_ns)


def split_calls(marks: list[Mark], host_pid: int) -> list[list[Mark]]:
    """The marks of each call: from one host.begin to the next."""
    calls: list[list[Mark]] = []
    for mark in marks:
        if mark.pid == host_pid and mark.label == "host.begin":
            calls.append([])
        if calls:
            calls[-1].append(mark)
    return calls


def phases_of(marks: list[Mark], host_pid: int, launcher_pid: int) -> Call:
    """Turn one call's marks into phases (see the module docstring)."""
    call = Call()
    last: dict[int, Mark] = {}
    previous: Mark | None = None
    marked_child_cpu = marked_child_faults = 0
    last_child_mono = 0
    for mark in marks:
        before = last.get(mark.pid)
        if mark.label == "launcher.reap":
            tree_cpu_ns, tree_faults = mark.values
            call.tree_cpu += tree_cpu_ns / 1e6  # with a warm pool, a child set up earlier
            call.tree_faults += tree_faults
            exit_cpu = max(tree_cpu_ns - marked_child_cpu, 0) / 1e6
            exit_faults = max(tree_faults - marked_child_faults, 0)
            exit_wall = (mark.mono_ns - last_child_mono) / 1e6
            call.phases["exit.teardown+reap"] = (exit_wall, exit_cpu, exit_faults)
        elif mark.label in ("host.begin", "host.close") or (
            before is None and mark.pid == launcher_pid
        ):
            pass  # the start of this call in a long-lived process or thread
        else:
            start = before or previous
            assert start is not None
            wall = (mark.mono_ns - start.mono_ns) / 1e6
            cpu = (mark.cpu_ns - (before.cpu_ns if before else 0)) / 1e6
            faults = mark.faults - (before.faults if before else 0)
            call.phases[mark.label] = (wall, cpu, faults)
            if mark.pid == launcher_pid:
                call.launcher_cpu += cpu
                call.launcher_faults += faults
            elif mark.label.startswith("host."):
                call.host_faults += faults
                if mark.pid != host_pid:
                    call.closer_cpu += cpu  # the host's closer thread puts the call away
            elif mark.pid != host_pid:
                marked_child_cpu += mark.cpu_ns - (before.cpu_ns if before else 0)
                marked_child_faults += faults
                last_child_mono = max(last_child_mono, mark.mono_ns)
        if mark.label == "launcher.reap" and mark.pid == launcher_pid:
            last[mark.pid] = mark
        elif mark.label != "launcher.reap":
            last[mark.pid] = mark
        previous = mark
    begin = next(m for m in marks if m.label == "host.begin")
    end = next(m for m in marks if m.label == "host.end")
    call.host_cpu = (end.cpu_ns - begin.cpu_ns) / 1e6 + call.closer_cpu
    call.wall = (end.mono_ns - begin.mono_ns) / 1e6
    return call


def _kernel_threads_ms() -> float:
    """CPU time of every kernel thread so far (children of kthreadd), in ms."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if entry == "2" or fields[1] == "2":  # ppid (field 4)
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total * TICK_MS


def _machine_busy_ms() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) * TICK_MS


def _process_faults_cpu(pid: int | None) -> tuple[int, float, int, float]:
    """A process's minor faults and CPU ms so far, and those of the children
    it reaped (zeros before it exists)."""
    if pid is None:
        return 0, 0.0, 0, 0.0
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = [int(f) for f in stat[stat.rindex(")") + 2 :].split()[7:15]]
    minflt, cminflt, _, _, utime, stime, cutime, cstime = fields
    return minflt, (utime + stime) * TICK_MS, cminflt, (cutime + cstime) * TICK_MS


def run_round(runner: ToolRunner, payload: dict[str, Any], calls: int) -> dict[str, float]:
    """`calls` serial calls; the machine-wide context figures of the round,
    and the launcher's faults over the whole round (its marks see only its
    requests: not its poll loop, nor its reaps)."""
    launcher_pid = runner.sandbox.launcher.pid
    launcher = _process_faults_cpu(launcher_pid)
    kernel, busy = _kernel_threads_ms(), _machine_busy_ms()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(calls):
        result, error = runner.run("trivial", payload)
        assert not error and result == {"ok": True}, error
        # The call is put away (reaped, its cgroup removed) in the sandbox's
        # closer thread after it returned: inside this call's window.
        runner.sandbox.settle()
    after = resource.getrusage(resource.RUSAGE_SELF)
    host_process = (after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime) * 1000
    launcher_after = _process_faults_cpu(launcher_pid)
    faults, cpu, children_faults, children_cpu = (
        (a - b) / calls for a, b in zip(launcher_after, launcher, strict=True)
    )
    return {
        "launcher_process_faults": faults,
        "launcher_process_ms": cpu,
        "reaped_faults": children_faults,
        "reaped_ms": children_cpu,
        "kernel_threads_ms": (_kernel_threads_ms() - kernel) / calls,
        "machine_busy_ms": (_machine_busy_ms() - busy) / calls,
        "host_process_ms": host_process / calls,
        "load": os.getloadavg()[0],
    }


Rounds = tuple[list[list[Call]], list[dict[str, float]]]


def measure(calls: int, rounds: int, prewarm: int, traced: bool = True) -> Rounds:
    """Untraced: the rounds' context figures only (no marks, no phases)."""
    with tempfile.TemporaryDirectory() as tmp:
        registry = trivial_plugin(tmp)
        trace_path = f"{tmp}/trace"
        if traced:
            trace.enable(trace_path)
        else:
            Path(trace_path).touch()
        sandbox = Sandbox(prewarm=prewarm)
        runner = ToolRunner(registry, sandbox)
        payload = {"image": b"\x89PNG", "mime_type": "image/png", "options": {}}
        contexts = []
        try:
            run_round(runner, payload, 5)  # detection, the launcher's start
            sandbox.settle()
            launcher_pid = sandbox.launcher.pid
            os.truncate(trace_path, 0)
            for _ in range(rounds):
                contexts.append(run_round(runner, payload, calls))
                contexts[-1]["marks_end"] = os.path.getsize(trace_path)
            marks = read_marks(trace_path)
        finally:
            sandbox.close()
    assert launcher_pid is not None
    per_round: list[list[Call]] = [[] for _ in range(rounds)]
    everything = [phases_of(c, os.getpid(), launcher_pid) for c in split_calls(marks, os.getpid())]
    for index, call in enumerate(everything):
        per_round[index // calls].append(call)
    return per_round, contexts


Columns = tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]], list[str]]


def columns(calls: list[Call]) -> Columns:
    """Per label, in the order first seen: every call's wall ms, CPU ms, faults."""
    walls: dict[str, list[float]] = defaultdict(list)
    cpus: dict[str, list[float]] = defaultdict(list)
    faults: dict[str, list[float]] = defaultdict(list)
    order: list[str] = []
    for call in calls:
        for label, (wall, cpu, fault) in call.phases.items():
            if label not in walls:
                order.append(label)
            walls[label].append(wall)
            cpus[label].append(cpu)
            faults[label].append(fault)
    return walls, cpus, faults, order


TOTALS = (
    ("host thread", "host_cpu", "host_faults"),
    ("launcher", "launcher_cpu", "launcher_faults"),
    ("call tree (rusage)", "tree_cpu", "tree_faults"),
)


def summary(calls: list[Call]) -> dict[str, tuple[float, float, float, float]]:
    """Label -> (wall p50 ms, CPU p50 ms, CPU share %, faults p50), totals included."""
    med = statistics.median
    walls, cpus, faults, order = columns(calls)
    total = sum(c.total_cpu for c in calls)
    out = {
        label: (
            med(walls[label]),
            med(cpus[label]),
            100 * sum(cpus[label]) / total,
            med(faults[label]),
        )
        for label in order
    }
    for name, cpu_attr, faults_attr in TOTALS:
        values = [getattr(c, cpu_attr) for c in calls]
        fault_p50 = med(getattr(c, faults_attr) for c in calls)
        out["CPU: " + name] = (0.0, med(values), 100 * sum(values) / total, fault_p50)
    out["CPU: total"] = (0.0, med(c.total_cpu for c in calls), 100.0, 0.0)
    out["wall: call"] = (med(c.wall for c in calls), 0.0, 0.0, 0.0)
    return out


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Two saved summaries side by side, by phase: wall and CPU p50, faults p50, CPU share."""
    lines = [
        "| phase | wall p50 before | after | CPU p50 before | after"
        " | faults p50 before | after | CPU share before | after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = list(before) + [label for label in after if label not in before]
    for label in labels:
        b, a = before.get(label), after.get(label)

        def cell(v: list[float] | None, i: int) -> str:
            return "-" if v is None or (i == 0 and not v[0] and v[1]) else f"{v[i]:.2f}"

        def fault(v: list[float] | None) -> str:
            return "-" if v is None or len(v) < 4 or not v[3] else f"{v[3]:.0f}"

        def share(v: list[float] | None) -> str:
            return "-" if v is None or not v[2] else f"{v[2]:.1f}%"

        lines.append(
            f"| {label} | {cell(b, 0)} | {cell(a, 0)} | {cell(b, 1)} | {cell(a, 1)}"
            f" | {fault(b)} | {fault(a)} | {share(b)} | {share(a)} |"
        )
    return lines


def table(calls: list[Call], markdown: bool) -> list[str]:
    med = statistics.median
    walls, cpus, faults, order = columns(calls)
    total_cpu = sum(c.total_cpu for c in calls)
    rows = [("phase (ends at mark)", "wall p50 ms", "CPU p50 ms", "faults p50", "CPU share")]
    for label in order:
        share = 100 * sum(cpus[label]) / total_cpu
        rows.append(
            (
                label,
                f"{med(walls[label]):.3f}",
                f"{med(cpus[label]):.3f}",
                f"{med(faults[label]):.0f}",
                f"{share:.1f}%",
            )
        )
    rows.append(("call (host entry to return)", f"{med(c.wall for c in calls):.3f}", "", "", ""))
    for name, cpu_attr, faults_attr in TOTALS:
        value = med(getattr(c, cpu_attr) for c in calls)
        fault = med(getattr(c, faults_attr) for c in calls)
        share = 100 * sum(getattr(c, cpu_attr) for c in calls) / total_cpu
        rows.append((f"CPU: {name}", "", f"{value:.3f}", f"{fault:.0f}", f"{share:.1f}%"))
    rows.append(("CPU: total per call", "", f"{med(c.total_cpu for c in calls):.3f}", "", "100%"))
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|---|---|---|---|---|"]
        return lines + ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return [f"{a:<34} {b:>11} {c:>11} {d:>10} {e:>9}" for a, b, c, d, e in rows]


def round_lines(per_round: list[list[Call]], contexts: list[dict[str, float]]) -> list[str]:
    """Per round: CPU per call (host process from rusage, so its other threads
    count too; launcher; call trees), wall p50, faults per call (launcher,
    call tree) and the machine's context."""
    lines = [
        "round  CPU/call mean  (host proc  launcher  tree)  wall p50"
        "  faults/call (launcher marked, process  tree)  kernel threads  machine busy  load"
    ]
    for index, (calls, ctx) in enumerate(zip(per_round, contexts, strict=True)):
        launcher = statistics.fmean(c.launcher_cpu for c in calls)
        tree = statistics.fmean(c.tree_cpu for c in calls)
        total = ctx["host_process_ms"] + launcher + tree
        launcher_faults = statistics.fmean(c.launcher_faults for c in calls)
        tree_faults = statistics.fmean(c.tree_faults for c in calls)
        lines.append(
            f"{index + 1:>5} {total:>11.2f} ms  ({ctx['host_process_ms']:>6.2f} {launcher:>9.2f}"
            f" {tree:>6.2f})  {statistics.median(c.wall for c in calls):>6.2f} ms"
            f"                      {launcher_faults:>7.0f} {ctx['launcher_process_faults']:>8.0f}"
            f" {tree_faults:>5.0f}"
            f" {ctx['kernel_threads_ms']:>12.2f} ms {ctx['machine_busy_ms']:>10.2f} ms"
            f" {ctx['load']:>5.1f}"
        )
    return lines


def floor_line(calls: int) -> str:
    """The fork floor's faults and CPU per call, measured now: the bare call
    of `scripts/bench.py`, `scripts/fork_floor.py`."""
    cost = fork_floor.measure("serial", calls)["cost"]
    return (
        f"os.fork + pipe, small parent: {cost['faults']:.0f} faults per call"
        f" (parent {cost['parent_faults']:.0f}, child {cost['children_faults']:.0f}),"
        f" {cost['cpu_ms']:.2f} ms CPU (parent {cost['parent_cpu_ms']:.2f},"
        f" child {cost['children_cpu_ms']:.2f})"
    )


def untraced_lines(contexts: list[dict[str, float]]) -> list[str]:
    """Per round of an untraced run: faults and CPU per call of the launcher
    process and of the call trees it reaped, from /proc (no trace's cost)."""
    lines = [
        "round  faults/call (launcher  reaped  sum)  CPU/call (host proc  launcher  reaped  sum)"
    ]
    for index, ctx in enumerate(contexts):
        faults = ctx["launcher_process_faults"] + ctx["reaped_faults"]
        cpu = ctx["host_process_ms"] + ctx["launcher_process_ms"] + ctx["reaped_ms"]
        lines.append(
            f"{index + 1:>5}  {ctx['launcher_process_faults']:>21.0f} {ctx['reaped_faults']:>7.0f}"
            f" {faults:>5.0f}  {ctx['host_process_ms']:>20.2f} {ctx['launcher_process_ms']:>9.2f}"
            f" {ctx['reaped_ms']:>7.2f} {cpu:>5.2f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--prewarm", type=int, default=0, help="warm children per plugin (totals only)"
    )
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--save", help="write the phases' summary (JSON) to this file")
    parser.add_argument(
        "--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print two saved summaries"
    )
    parser.add_argument(
        "--untraced",
        action="store_true",
        help="no trace: faults and CPU per call of the launcher and its reaped calls only",
    )
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        print("\n".join(compare(before, after)))
        return
    if args.untraced:
        _, contexts = measure(args.calls, args.rounds, args.prewarm, traced=False)
        print(f"{args.calls} serial calls a round, untraced, prewarm {args.prewarm}")
        print("\n".join(untraced_lines(contexts)))
        print(floor_line(args.calls))
        return
    per_round, contexts = measure(args.calls, args.rounds, args.prewarm)
    calls = [call for round_ in per_round for call in round_]
    print(f"{len(calls)} serial calls, prewarm {args.prewarm}, {os.cpu_count()} cores")
    if not args.prewarm:
        # A warm child sets up while the previous call runs, in the pool's
        # thread: its marks fall in another call's window, so only totals.
        print("\n".join(table(calls, args.markdown)))
        print()
        if args.save:
            Path(args.save).write_text(json.dumps(summary(calls), indent=1))
    print("\n".join(round_lines(per_round, contexts)))
    print(floor_line(args.calls))


if __name__ == "__main__":
    main()
