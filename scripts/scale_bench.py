"""Figures of a multi-node deployment against the embedded single node.

    embedded        build_services(SQLite)  ->  its own sandbox pool (workers=2)
    1 worker node   API services (this process) -> PostgreSQL -> `plughost worker --workers 2`
    2 worker nodes  the same with two worker processes

For each: jobs/s for a batch of trivial jobs (submitted all at once, timed
to the last result), the latency of one job at a time (p50, p95), and the
CPU time per job of each part (this process with its sandboxes, the
PostgreSQL server, the worker nodes with theirs), read from the process
trees. From those: the dispatch overhead per job (CPU and latency added
over the embedded path) and how many sandbox nodes one PostgreSQL server
could feed. Needs root (a private PostgreSQL server runs as its own user).

    python scripts/scale_bench.py [--jobs 1000] [--sequential 100] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from host.config import Settings  # noqa: E402
from host.services.build import Services, build_services  # noqa: E402
from host.services.store import JobStatus, SQLiteJobStore  # noqa: E402
from tests.cluster.pg import PgCluster  # noqa: E402
from tests.conftest import make_png, write_plugin  # noqa: E402

PAYLOAD = {"image": make_png(8, 8), "mime_type": "image/png", "options": {}}
FAST = {"PLUGHOST_HEARTBEAT_S": "1", "PLUGHOST_STALLED_AFTER_S": "10"}


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds of these processes and every descendant, reaped ones included."""
    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system + t.children_user + t.children_system
    return total


def own_cpu() -> float:
    """CPU seconds of this process alone (its worker-node children are counted apart)."""
    t = psutil.Process().cpu_times()
    return t.user + t.system


def postmaster_pid(pg: PgCluster) -> int:
    return int((pg.data / "postmaster.pid").read_text().split()[0])


def wait_all(futures: list[Any], timeout_s: float) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    return [f.result(timeout=max(0.1, deadline - time.monotonic())) for f in futures]


def measure(
    services: Services, groups: dict[str, Callable[[], list[int]]], jobs: int, sequential: int
) -> dict[str, Any]:
    """Throughput, latency and CPU per job of one configuration."""
    wait_all([services.analysis.submit("echo", PAYLOAD)[1] for _ in range(20)], 120)  # warm-up
    before = {name: read() for name, read in groups.items()}
    started = time.monotonic()
    done = wait_all([services.analysis.submit("echo", PAYLOAD)[1] for _ in range(jobs)], 600)
    elapsed = time.monotonic() - started
    cpu = {name: (read() - before[name]) / jobs for name, read in groups.items()}
    assert all(job.status is JobStatus.SUCCESS for job in done)
    latencies = []
    for _ in range(sequential):
        t0 = time.monotonic()
        job = services.analysis.submit("echo", PAYLOAD)[1].result(timeout=60)
        latencies.append((time.monotonic() - t0) * 1000)
        assert job.status is JobStatus.SUCCESS
    latencies.sort()
    return {
        "jobs_per_s": round(jobs / elapsed, 1),
        "latency_p50_ms": round(statistics.median(latencies), 2),
        "latency_p95_ms": round(latencies[int(len(latencies) * 0.95) - 1], 2),
        "cpu_ms_per_job": {name: round(value * 1000, 3) for name, value in cpu.items()},
    }


@contextmanager
def worker_nodes(url: str, plugins: Path, count: int, logs: Path) -> Iterator[list[int]]:
    procs = []
    for n in range(count):
        stream = (logs / f"worker-{n}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "host.cli",
                    "worker",
                    "--database-url",
                    url,
                    "--plugins-dir",
                    str(plugins),
                    "--workers",
                    "2",
                    "--log-level",
                    "warning",
                ],
                stdout=stream,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **FAST, "PYTHONPATH": str(ROOT)},
            )
        )
        stream.close()
    try:
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def embedded(plugins: Path, top: Path, jobs: int, sequential: int) -> dict[str, Any]:
    settings = Settings(plugins_dirs=[str(plugins)], workers=2, queue_size=100_000)
    services = build_services(settings, store=SQLiteJobStore(top / "jobs.sqlite3"))
    try:
        # This process with its launcher and sandboxes: the whole single node.
        return measure(services, {"front": lambda: tree_cpu([os.getpid()])}, jobs, sequential)
    finally:
        services.jobs.shutdown()
        services.plugins.close()


def cluster(
    pg: PgCluster, plugins: Path, top: Path, nodes: int, jobs: int, sequential: int
) -> dict[str, Any]:
    url = pg.database(f"bench{nodes}")
    settings = Settings(
        database_url=url,
        plugins_dirs=[str(plugins)],
        prewarm=0,
        heartbeat_s=1.0,
        stalled_after_s=10.0,
    )
    services = build_services(settings)
    try:
        with worker_nodes(url, plugins, nodes, top) as pids:
            deadline = time.monotonic() + 60
            while sum(n["healthy"] for n in services.nodes() if n["role"] == "worker") < nodes:
                assert time.monotonic() < deadline, "worker nodes did not come up"
                time.sleep(0.2)
            groups = {
                "front": own_cpu,
                "postgres": lambda: tree_cpu([postmaster_pid(pg)]),
                "workers": lambda: tree_cpu(pids),
            }
            return measure(services, groups, jobs, sequential)
    finally:
        services.jobs.shutdown()
        services.plugins.close()


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Dispatch overhead, and the sandbox nodes one PostgreSQL server could feed."""
    base, one = results["embedded"], results["1 worker node"]
    cluster_cpu = sum(one["cpu_ms_per_job"].values())
    pg_ms = one["cpu_ms_per_job"]["postgres"]
    per_core = 1000 / pg_ms if pg_ms else float("inf")
    node_rate = one["jobs_per_s"]
    return {
        "dispatch_cpu_ms_per_job": round(cluster_cpu - base["cpu_ms_per_job"]["front"], 3),
        "dispatch_latency_ms_p50": round(one["latency_p50_ms"] - base["latency_p50_ms"], 2),
        "postgres_jobs_per_s_per_core": round(per_core, 0),
        "nodes_fed_per_postgres_core": round(per_core / node_rate, 1) if node_rate else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--sequential", type=int, default=100)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="plughost-scale-"))
    plugins = top / "plugins"
    write_plugin(plugins, "echo", 'return {"size": len(payload["image"])}')
    pg = PgCluster()
    try:
        results: dict[str, Any] = {
            "embedded": embedded(plugins, top, args.jobs, args.sequential),
            "1 worker node": cluster(pg, plugins, top, 1, args.jobs, args.sequential),
            "2 worker nodes": cluster(pg, plugins, top, 2, args.jobs, args.sequential),
        }
    finally:
        pg.close()
    results["derived"] = derive(results)
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
