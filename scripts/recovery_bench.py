"""How long a job whose worker node is killed takes to run again, measured
from outside.

    PostgreSQL (a private server in a temporary directory)
    API node      `plughost serve` (a process): jobs are submitted over HTTP
    worker nodes  two `plughost worker --workers SLOTS` processes

Each round submits as many jobs (napping a minute: none ends on its own)
as one worker has slots, SIGKILLs the worker running most of them once
every one runs (the other worker has room for all it ran), and reads
from the database, per job it was running, when the job was claimed
again (`started_at` of attempt 2, on the other worker): the recovery
time is that minus the moment of the kill. The round's jobs are then
cancelled and the killed worker replaced. Prints p50/p95/p99/max beside
the settings that bound them (`stalled_after_s`, `heartbeat_s`; the
product's defaults unless given). Needs root (PostgreSQL runs as its own user, the
sandboxes as theirs).

    python scripts/recovery_bench.py [--kills 10] [--slots 8] [--job-s 60] [--json FILE]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from host.cluster.schema import ensure_schema  # noqa: E402
from host.config import Settings  # noqa: E402
from sandbox.supervisor import uid_range  # noqa: E402
from tests.cluster.pg import PgCluster, free_port  # noqa: E402
from tests.conftest import make_png, write_plugin  # noqa: E402

IMAGE = base64.b64encode(make_png(8, 8)).decode()


class Nodes:
    """The API node and the worker nodes, as processes of this script."""

    def __init__(self, url: str, plugins: Path, logs: Path, env: dict[str, str]) -> None:
        self.url = url
        self.plugins = plugins
        self.logs = logs
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = free_port()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as stream:
            proc = subprocess.Popen(
                [sys.executable, "-m", "host.cli", *argv],
                stdout=stream,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**self.env, **env},
            )
        self.procs.append(proc)
        return proc

    def api(self) -> None:
        self._spawn(
            "api",
            ["serve", "--database-url", self.url, "--plugins-dir", str(self.plugins),
             "--port", str(self.port), "--prewarm", "0", "--log-level", "warning"],
            {"PLUGHOST_SELF_CHECK": "false", "PLUGHOST_MAX_JOBS_PER_CLIENT": "100000"},
        )  # fmt: skip

    def worker(self, slots: int) -> subprocess.Popen[bytes]:
        n = len(self.procs)
        # A uid range of its own, as a separate machine would have: a killed
        # node's sandboxes may still be dying when its replacement starts.
        uids = str(uid_range().start + 1024 * (n % 48 + 1))
        return self._spawn(
            f"worker-{n}",
            ["worker", "--database-url", self.url, "--plugins-dir", str(self.plugins),
             "--workers", str(slots), "--max-attempts", "10", "--log-level", "warning"],
            {"PLUGHOST_UID_BASE": uids},
        )  # fmt: skip

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def wait_for(predicate: Any, timeout_s: float, what: str, every_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)
    return value


def submit(port: int, seconds: float) -> str | None:
    body = {"plugin": "work", "image": IMAGE, "mime_type": "image/png", "options": {"s": seconds}}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/jobs",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return str(json.loads(answer.read())["job"]["id"])
    except (OSError, urllib.error.HTTPError, KeyError):
        return None


def live_workers(url: str, stalled_after_s: float) -> dict[int, str]:
    """pid -> name of the workers with a fresh heartbeat."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT pid, name FROM plughost_nodes WHERE role = 'worker' "
            "AND last_heartbeat > now() - make_interval(secs => %s)",
            (stalled_after_s,),
        ).fetchall()
    return {int(pid): str(name) for pid, name in rows}


def jobs(url: str, ids: list[str]) -> dict[str, tuple[str, int, str | None, str | None]]:
    """id -> (status, attempts, node, started_at)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT id, status, attempts, node, started_at FROM plughost_jobs WHERE id = ANY(%s)",
            (ids,),
        ).fetchall()
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


def cancel(port: int, job_ids: list[str]) -> None:
    def one(job_id: str) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/jobs/{job_id}", method="DELETE"
        )
        try:
            urllib.request.urlopen(request, timeout=30).close()
        except (OSError, urllib.error.HTTPError):
            return  # finished already: nothing to cancel

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, job_ids))


def fill(nodes: Nodes, args: argparse.Namespace) -> tuple[list[str], dict[str, list[str]]]:
    """Submit `slots` jobs (both workers together have room for twice as
    many) and wait until each runs; return them and the running ones by node."""
    url = nodes.url
    ids = [submit(nodes.port, args.job_s) for _ in range(args.slots)]
    accepted = [job_id for job_id in ids if job_id]
    if len(accepted) != len(ids):
        raise RuntimeError(f"the API node accepted {len(accepted)} of {len(ids)} jobs")
    rows = wait_for(
        lambda: (
            (found := jobs(url, accepted))
            and all(row[0] == "RUNNING" for row in found.values())
            and found
        ),
        120,
        "every job to run",
    )
    by_node: dict[str, list[str]] = {}
    for job_id, row in rows.items():
        by_node.setdefault(str(row[2]), []).append(job_id)
    return accepted, by_node


def one_kill(
    nodes: Nodes, workers: list[subprocess.Popen[bytes]], args: argparse.Namespace
) -> list[float]:
    """Kill the worker running most of a round's jobs (the other one has
    room for them all); return the recovery time of each job it ran."""
    url, stalled = nodes.url, args.stalled_after_s
    wait_for(lambda: len(live_workers(url, stalled)) == 2, 120, "two live workers")
    names = live_workers(url, stalled)
    accepted, by_node = fill(nodes, args)
    victim = max(workers, key=lambda proc: len(by_node.get(names.get(proc.pid, ""), [])))
    killed_node = names[victim.pid]
    hit = by_node[killed_node]
    killed_at = time.time()
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)

    def again() -> dict[str, tuple[str, int, str | None, str | None]] | None:
        rows = jobs(url, hit)
        done = all(r[1] >= 2 and r[2] != killed_node and r[3] for r in rows.values())
        return rows if done else None

    rows = wait_for(again, 30 * stalled + 120, "the killed worker's jobs to run again", 0.2)
    cancel(nodes.port, accepted)  # the next round starts on idle workers
    workers[workers.index(victim)] = nodes.worker(args.slots)
    return [datetime.fromisoformat(str(r[3])).timestamp() - killed_at for r in rows.values()]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main() -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kills", type=int, default=10, help="workers killed, one per round")
    parser.add_argument("--slots", type=int, default=8, help="sandboxes per worker")
    parser.add_argument("--job-s", type=float, default=60.0, help="how long each job naps")
    parser.add_argument("--stalled-after-s", type=float, default=defaults.stalled_after_s)
    parser.add_argument("--heartbeat-s", type=float, default=defaults.heartbeat_s)
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="plughost-recovery-"))
    plugins = top / "plugins"
    write_plugin(plugins, "work", 'time.sleep(payload["options"]["s"])\nreturn {}', timeout_s=120)
    env = {
        "PLUGHOST_STALLED_AFTER_S": str(args.stalled_after_s),
        "PLUGHOST_HEARTBEAT_S": str(args.heartbeat_s),
    }
    pg = PgCluster()
    nodes = Nodes(pg.database("recovery"), plugins, top, env)
    ensure_schema(nodes.url)
    started = time.monotonic()
    samples: list[float] = []
    try:
        workers = [nodes.worker(args.slots), nodes.worker(args.slots)]
        nodes.api()
        wait_for(lambda: submit(nodes.port, 0.01), 120, "the API node to accept a job", 0.5)
        for kill in range(args.kills):
            found = one_kill(nodes, workers, args)
            samples += found
            print(f"kill {kill + 1}: {len(found)} jobs, {min(found):.1f}-{max(found):.1f} s")
    finally:
        nodes.close()
        pg.close()
    figures = {
        "jobs_killed": len(samples),
        "kills": args.kills,
        "stalled_after_s": args.stalled_after_s,
        "heartbeat_s": args.heartbeat_s,
        "p50_s": round(statistics.median(samples), 2),
        "p95_s": round(percentile(samples, 0.95), 2),
        "p99_s": round(percentile(samples, 0.99), 2),
        "max_s": round(max(samples), 2),
        "min_s": round(min(samples), 2),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
