"""The API side of a multi-node deployment: jobs recorded in PostgreSQL and
dispatched to worker nodes through Procrastinate. An API node's
JobManagementService composes `ProcrastinateDispatch` as its runner.

    JobManagementService.enqueue(plugin, payload, owner)
      |  PluginManagementService.check (bad input, unknown, quarantined everywhere)
      |  ProcrastinateDispatch.admit: a live worker has this plugin version
      |    (name + content hash)? else 503 no_worker
      |  owner's quota (as on one node)
      |  ONE transaction: INSERT plughost_jobs + Procrastinate defer on the
      |    plugin's queue (PgJobStore.add calls ProcrastinateDispatch.dispatch)
      v
    worker node (host/cluster/worker.py) runs it, writes the result once, NOTIFYs
      v
    JobWaiter resolves the job's Future (what /v1/analyze awaits)

Cancel: a PENDING job is CANCELLED in the database (a worker that fetched it
already finds it so and does not run it); a RUNNING one gets Procrastinate's
abort request, which reaches its node, which kills the sandbox.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import procrastinate
import psycopg
from procrastinate.job_context import JobContext

from host.cluster.nodes import NodeBook, serving_nodes
from host.cluster.pgstore import DatabaseUnavailable, PgJobStore
from host.cluster.shared import SharedStats
from host.cluster.waiter import JobWaiter
from host.errors import JobFinished, JobNotFound, ServiceError, envelope
from host.services.plugins import PluginManagementService
from host.services.store import Job, JobStatus

TASK_NAME = "plughost.run_job"
COUNTS_CACHE_S = 1.0


class NoWorker(ServiceError):
    """No live worker node has the plugin version the job was accepted for."""

    def __init__(self, plugin: str, digest: str) -> None:
        super().__init__(
            envelope(
                "no_worker",
                f"no live worker node has plugin {plugin!r} with this version and content",
                plugin=plugin,
                hash=digest,
                retry_after_s=5.0,
            )
        )


def _run_job(context: JobContext, job_id: str) -> None:
    """The Procrastinate task: hand the job to the worker node running it."""
    context.additional_context["node"].handle(job_id, context)


def make_app(connector: Any) -> procrastinate.App:
    """A Procrastinate app with plughost's one task, on `connector`."""
    app = procrastinate.App(connector=connector)
    app.task(name=TASK_NAME, pass_context=True)(_run_job)
    return app


class ClusterPluginService(PluginManagementService):
    """Plugins as the API node knows them, with state and metrics over every
    node, and the live nodes that serve each one."""

    def __init__(self, *args: Any, stats: SharedStats, nodes: NodeBook, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stats = stats
        self.nodes = nodes
        self.inventory: dict[str, dict[str, str]] = {}

    def describe(self, name: str, admin: bool = False, scope: str | None = None) -> dict[str, Any]:
        found = super().describe(name, admin, scope)
        shared = self.stats.status(name)
        if shared is not None:
            found["state"] = shared.pop("state")
            if scope is None:  # every client's calls: the admin's figures
                found["metrics"] = shared
        mine = self.inventory.get(name, {})
        found["hash"] = mine.get("hash")
        found["nodes"] = serving_nodes(self.nodes.nodes(), name, mine.get("hash", ""))
        return found

    def list_plugins(self, admin: bool = False, scope: str | None = None) -> list[dict[str, Any]]:
        return [self.describe(name, admin, scope) for name in self.registry.list_plugins()]


class ProcrastinateDispatch:
    """The `JobRunner` of an API node: jobs run on worker nodes, dispatched
    through Procrastinate; their ends are read back from the shared store."""

    in_process = False

    def __init__(
        self, plugins: ClusterPluginService, store: PgJobStore, app: procrastinate.App, url: str
    ) -> None:
        self.pg = store
        self.app = app
        self.plugins = plugins
        self.waiter = JobWaiter(store, url)
        self._counts: tuple[float, dict[str, float]] = (-COUNTS_CACHE_S, {})
        self._counts_lock = threading.Lock()
        store.dispatch = self.dispatch
        for name, text, key in (
            ("plughost_cluster_queue_depth", "Jobs waiting for any worker node.", "pending"),
            ("plughost_cluster_jobs_running", "Jobs running on worker nodes.", "running"),
            (
                "plughost_cluster_oldest_waiting_seconds",
                "Age of the oldest waiting job.",
                "oldest_pending_s",
            ),
            ("plughost_cluster_workers_live", "Worker nodes with a fresh heartbeat.", "workers"),
            (
                "plughost_cluster_worker_slots",
                "Sandboxes the live worker nodes run at once.",
                "slots",
            ),
        ):
            plugins.metrics.gauge(name, text, self._count_reader(key))

    def _count_reader(self, key: str) -> Callable[[], float]:
        return lambda: self.cluster_counts().get(key, 0)

    def dispatch(self, conn: psycopg.Connection[Any], job: Job, priority: int = 0) -> int:
        """Defer `job` on its plugin's queue inside `conn`'s transaction (the
        store's insert of the job calls it). Workers take the highest
        `priority` first, the oldest of equals: a batch's item i gets
        -(i + the jobs its owner has PENDING), so a job of its own waits
        behind no more than the first item of each client's batches, and
        clients' batches of one plugin advance side by side."""
        queue = self.plugins.inventory[job.plugin]["queue"]
        deferrer = self.app.tasks[TASK_NAME].configure(
            queue=queue, connection=conn, priority=priority
        )
        return int(deferrer.defer(job_id=job.id))

    def admit(self, plugin_name: str) -> None:
        """Raises NoWorker unless a live worker node has this plugin version."""
        mine = self.plugins.inventory.get(plugin_name)
        if mine is None or not self.plugins.nodes.serves(mine["queue"]):
            raise NoWorker(plugin_name, mine["hash"] if mine else "")

    def withdraw(self) -> None:
        """Nothing was taken: a worker node's room is its own."""

    def submit(self, job_id: str) -> Future[Job]:
        """The job was queued with its row; wait for its end there."""
        return self.waiter.watch(job_id)

    def follow(self, job_id: str) -> Future[Job] | None:
        """Wait for the end of a job any API node queued, as `submit` does."""
        return self.waiter.watch(job_id)

    def cancel(self, job: Job) -> None:
        """Cancel a pending job in the database, or ask the node running it
        to kill its sandbox. Raises JobNotFound, JobFinished."""
        error = envelope("cancelled", "job was cancelled before it ran", plugin=job.plugin)
        status, queue_job = self.pg.cancel_pending(job.id, error["error"])
        if not status:
            raise JobNotFound(job.id)  # pruned since it was read
        if status not in (JobStatus.RUNNING.value, JobStatus.CANCELLED.value):
            raise JobFinished(job.id, status)
        if queue_job is not None:
            running = status == JobStatus.RUNNING.value
            self._cancel_queued(queue_job, abort=running)

    def _cancel_queued(self, queue_job: int, abort: bool) -> None:
        try:
            with self.pg.connection() as conn:
                self.app.job_manager.cancel_job_by_id(queue_job, abort=abort, connection=conn)
        except procrastinate.exceptions.ConnectorException as exc:
            raise DatabaseUnavailable(exc) from exc

    def retry_after(self) -> float:
        """No queue of this node's to wait out: a second, for a quota refusal."""
        return 1.0

    def cluster_counts(self) -> dict[str, float]:
        """Waiting and running jobs, oldest wait, live workers and their slots
        (read at most every COUNTS_CACHE_S)."""
        with self._counts_lock:
            read_at, counts = self._counts
            if time.monotonic() - read_at < COUNTS_CACHE_S:
                return counts
        try:
            counts = dict(self.pg.counts())
            workers = [n for n in self.plugins.nodes.nodes() if n["role"] == "worker"]
        except DatabaseUnavailable:
            return counts  # the last figures; the database answers the next scrape
        live = [n for n in workers if n["healthy"]]
        counts["workers"] = len(live)
        counts["slots"] = sum(n["concurrency"] for n in live)
        with self._counts_lock:
            self._counts = (time.monotonic(), counts)
        return counts

    def stats(self) -> dict[str, int]:
        counts = self.cluster_counts()
        return {
            "workers": int(counts.get("slots", 0)),
            "queue_size": 0,
            "running": int(counts.get("running", 0)),
            "queued": int(counts.get("pending", 0)),
        }

    def nodes(self) -> list[dict[str, Any]]:
        """Every node with its last heartbeat, plugins and health."""
        return self.plugins.nodes.nodes()

    def stop_starting(self) -> None:
        """Jobs queue in the database and start on worker nodes: nothing in
        this process to hold back (its waiting requests wait on)."""

    def shutdown(self, timeout_s: float) -> None:
        """Stop waiting for results; jobs go on on their worker nodes."""
        self.waiter.close()
        self.pg.pool.close()
