"""A sandbox node of a multi-node deployment (`plughost worker`).

    PostgreSQL (procrastinate_jobs, queues "<hash>.<plugin>" of this node's plugins)
      |  Procrastinate Worker: LISTEN/NOTIFY + SKIP LOCKED fetch, `workers` at once
      v
    WorkerNode.handle(job id)       in one of Procrastinate's task threads (the
      |                             loop's default executor: a thread per slot)
      |  claim: attempts + 1, fenced (a finished job, or one a live node holds, is not run)
      |  input read from plughost_jobs
      |  PluginManagementService.execute_plugin -> ToolRunner -> this node's own Sandbox
      |     (an abort request for the job cancels its token: the sandbox is killed)
      |  record_finished (as on a single node): the result written once, only
      |     by the attempt holding the job; NOTIFY
      v
    plughost_jobs row final; the API node waiting on it wakes up

Beside it, on the node: a heartbeat thread (plughost_nodes), the
callback deliverer (host/services/callbacks.py: due callbacks of jobs
that ended on any node, claimed with SKIP LOCKED), and the
stalled-job recovery step, every `recover_every_s` on the event loop (its
database work on a thread of its own, which running jobs cannot hold): jobs
of workers whose Procrastinate heartbeat lapsed go back to their queue,
or end INTERRUPTED once they used `max_attempts`. A database outage stops
the Procrastinate worker; the node keeps its running jobs, waits for the
database and starts a new one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import procrastinate
import psycopg
from procrastinate.job_context import AbortReason, JobContext

from host.cluster.dispatch import TASK_NAME, make_app
from host.cluster.nodes import NodeBook, inventory
from host.cluster.pgstore import DatabaseUnavailable, PgJobStore, open_pool
from host.cluster.recovery import recover_entry
from host.cluster.schema import ensure_schema
from host.cluster.shared import SharedQuarantine, SharedStats
from host.privileges import PrivilegeError, drop_to
from host.registry import PluginRegistry
from host.services.batchrows import job_ended
from host.services.callbacks import CallbackService, CallbackSettings, database_secret, renders
from host.services.callbackstore import outbox_for
from host.services.finished import input_gone, record_finished
from host.services.plugins import PluginManagementService
from sandbox.supervisor import Sandbox

log = logging.getLogger("plughost.worker")
T = TypeVar("T")
ABORT_POLL_S = 0.05
# Threads of the event loop's default executor beside one per job slot
# (Procrastinate runs each job's `handle` there): asyncio's own default,
# min(32, CPUs + 4), would hold jobs in its queue, taken off the shared
# queue but not started, while the node has free slots.
SPARE_THREADS = 4
MAX_PAUSE_S = 5.0


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker node runs (the settings of the same names in `host.config.Settings`)."""

    database_url: str
    concurrency: int
    max_attempts: int = 3
    heartbeat_s: float = 2.0
    stalled_after_s: float = 10.0
    recover_every_s: float = 2.0
    db_patience_s: float = 600.0
    metrics_address: tuple[str, int] | None = None  # (host, port) of GET /metrics; None: off
    user: str | None = None  # started as root: become this user once the sandbox is set up
    callbacks: CallbackSettings | None = None  # None: this node delivers no callbacks


class WorkerNode:
    """One sandbox node: its plugins, its sandbox, its Procrastinate worker."""

    def __init__(
        self,
        options: WorkerOptions,
        registry: PluginRegistry,
        sandbox: Sandbox,
        quarantine: tuple[int, float] = (3, 60.0),
    ) -> None:
        self.options = options
        self.pool = open_pool(options.database_url, max_size=options.concurrency + 3)
        self.store = PgJobStore(self.pool)
        self.book = NodeBook(self.store, "worker", options.stalled_after_s)
        self.name = self.book.name
        self.plugins = PluginManagementService(
            registry, sandbox, quarantine=SharedQuarantine(self.store, *quarantine)
        )
        self.stats = SharedStats(self.store)
        self.inventory = inventory(registry)
        self.queues = sorted(p["queue"] for p in self.inventory.values())
        self.app = make_app(procrastinate.PsycopgConnector(conninfo=options.database_url))
        self._running = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._work: asyncio.Task[None] | None = None
        # Callbacks of jobs and batches that end anywhere, delivered by every node that has them on.
        self.callbacks: CallbackService | None = None
        if options.callbacks is not None:
            self.callbacks = CallbackService(
                options.callbacks,
                outbox_for(self.store),
                database_secret(self.store),
                renders(self.store, options.callbacks),
            )
        # The recovery step's database work, on a thread no job can hold:
        # on the loop's default executor it would wait behind running jobs.
        self._recovery = ThreadPoolExecutor(1, thread_name_prefix="plughost-recovery")
        metrics = self.plugins.metrics
        metrics.gauge(
            "plughost_worker_slots",
            "Sandboxes this node runs at once.",
            lambda: options.concurrency,
        )
        metrics.gauge(
            "plughost_worker_jobs_running", "Jobs running on this node.", lambda: self._running
        )

    # -- one job ------------------------------------------------------------

    def handle(self, job_id: str, context: JobContext) -> None:
        """Run job `job_id` if this node may; record its end once
        (`record_finished`, as a single node does)."""
        o = self.options
        claim = self._patiently(
            lambda: self.store.claim(job_id, self.name, o.stalled_after_s, o.max_attempts)
        )
        if claim.job is None:
            log.info("job not taken", extra={"job_id": job_id, "exhausted": claim.exhausted})
            if claim.exhausted:  # ended INTERRUPTED here: maybe its batch's last item
                ended = self._patiently(lambda: job_ended(self.store, job_id))
                if ended and self.callbacks is not None:
                    self.callbacks.wake()  # the batch's callback is due
            return
        job = claim.job
        with self._lock:
            self._running += 1
        try:
            payload = self._patiently(lambda: self.store.payload(job_id))
            started = time.monotonic()
            if payload is None:
                outcome = input_gone(job.plugin)
            else:
                outcome = self._execute(job.plugin, payload, context)
            record_finished(
                job,
                outcome,
                (time.monotonic() - started) * 1000,
                lambda final: self._patiently(lambda: self.store.finish(final, claim.attempt)),
                observe=self.stats.record,
                logger=log,
                ended=lambda final: self._patiently(lambda: job_ended(self.store, final.id)),
                attempt=claim.attempt,
            )
            if self.callbacks is not None:
                self.callbacks.wake()
        finally:
            with self._lock:
                self._running -= 1

    def _execute(
        self, plugin: str, payload: dict[str, Any], context: JobContext
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        token = self.plugins.cancellation()
        done = threading.Event()

        def watch() -> None:
            # A cancel reaches this node as Procrastinate's abort request.
            while not done.wait(ABORT_POLL_S):
                if context.abort_reason() is AbortReason.USER_REQUEST:
                    token.cancel()
                    return

        watcher = threading.Thread(target=watch, name="plughost-abort-watch", daemon=True)
        watcher.start()
        try:
            return self.plugins.execute_plugin(plugin, payload, cancel=token)
        finally:
            done.set()
            watcher.join()
            token.close()

    def _patiently(self, step: Callable[[], T]) -> T:
        """Run a database step, waiting out an outage of up to `db_patience_s`."""
        deadline = time.monotonic() + self.options.db_patience_s
        pause = 0.1
        while True:
            try:
                return step()
            except DatabaseUnavailable:
                if time.monotonic() > deadline:
                    raise
                log.warning("database unreachable; retrying in %.1fs", pause)
                time.sleep(pause)
                pause = min(MAX_PAUSE_S, pause * 2)

    # -- the node's loops ---------------------------------------------------

    def _heartbeat_forever(self) -> None:
        while not self._stop.wait(self.options.heartbeat_s):
            with self._lock:
                running = self._running
            try:
                if not self.book.heartbeat(running):
                    self.book.register(self.inventory, self.options.concurrency)
            except DatabaseUnavailable as exc:
                log.warning("heartbeat not sent: %s", exc)

    async def _recover_forever(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(self.options.recover_every_s)
            try:
                await self.recover_once()
            except (procrastinate.exceptions.ConnectorException, DatabaseUnavailable) as exc:
                log.warning("stalled-job recovery skipped: %s", exc)

    async def recover_once(self) -> int:
        """Handle the queue entries of stalled queue workers
        (host/cluster/recovery.py); return how many changed."""
        o = self.options
        manager = self.app.job_manager
        stalled = await manager.get_stalled_jobs(
            task_name=TASK_NAME, seconds_since_heartbeat=o.stalled_after_s
        )
        loop = asyncio.get_running_loop()
        handled = 0
        for queued in stalled:
            recover = functools.partial(
                recover_entry, self.store, queued, o.max_attempts, o.stalled_after_s
            )
            action = await loop.run_in_executor(self._recovery, recover)
            handled += action not in ("busy", "skipped")
        await manager.prune_stalled_workers(o.stalled_after_s * 3)
        await loop.run_in_executor(self._recovery, self.book.prune, o.stalled_after_s * 3)
        return handled

    async def _work_once(self) -> None:
        o = self.options
        async with self.app.open_async():
            await self.app.run_worker_async(
                queues=self.queues,
                name=self.name,
                concurrency=o.concurrency,
                additional_context={"node": self},
                install_signal_handlers=False,
                update_heartbeat_interval=o.heartbeat_s,
                stalled_worker_timeout=o.stalled_after_s,
                abort_job_polling_interval=1.0,
                fetch_job_polling_interval=1.0,
                delete_jobs="successful",
            )

    async def serve(self) -> None:
        """Run until stop(): the Procrastinate worker (restarted after a
        database outage) and the recovery step."""
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(
                self.options.concurrency + SPARE_THREADS, thread_name_prefix="plughost-job"
            )
        )
        recovery = asyncio.create_task(self._recover_forever(), name="plughost-recovery")
        pause = 0.2
        try:
            while not self._stop.is_set():
                self._work = asyncio.create_task(self._work_once(), name="plughost-queue-worker")
                try:
                    await self._work
                    pause = 0.2
                except asyncio.CancelledError:
                    # stop(): Procrastinate let the running jobs finish first.
                    if not self._stop.is_set():
                        raise
                except (procrastinate.exceptions.ConnectorException, psycopg.Error) as exc:
                    log.warning("queue worker stopped (%s); restarting in %.1fs", exc, pause)
                    await asyncio.sleep(pause)
                    pause = min(MAX_PAUSE_S, pause * 2)
        finally:
            recovery.cancel()
            await asyncio.gather(recovery, return_exceptions=True)
            self._recovery.shutdown(wait=False)

    def stop(self) -> None:
        """Stop taking jobs; running ones finish first. Call it on the node's event loop."""
        self._stop.set()
        if self._work is not None:
            self._work.cancel()

    def start(self) -> threading.Thread:
        """Create the schema if missing, register this node, start its heartbeat."""
        self._patiently(lambda: _schema(self.options.database_url))
        self._patiently(lambda: self.book.register(self.inventory, self.options.concurrency))
        beat = threading.Thread(target=self._heartbeat_forever, name="plughost-heartbeat")
        beat.start()
        if self.callbacks is not None:
            self.callbacks.start()
        return beat

    def close(self, beat: threading.Thread) -> None:
        self._stop.set()
        beat.join(self.options.heartbeat_s + 5)
        if self.callbacks is not None:
            self.callbacks.stop()
        try:
            self.book.leave()
        except DatabaseUnavailable as exc:
            log.warning("node row left behind (it ages out): %s", exc)
        self.pool.close()
        self.plugins.close()


def _schema(url: str) -> None:
    try:
        ensure_schema(url)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(exc) from exc


class _MetricsHandler(BaseHTTPRequestHandler):
    node: WorkerNode

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        if self.path != "/metrics":
            self.send_error(404)
            return
        body = self.node.plugins.metrics.render().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


def serve_metrics(node: WorkerNode, address: tuple[str, int]) -> ThreadingHTTPServer:
    """This node's Prometheus metrics on `address` (GET /metrics), in a thread."""
    handler = type("Handler", (_MetricsHandler,), {"node": node})
    server = ThreadingHTTPServer(address, handler)
    threading.Thread(target=server.serve_forever, name="plughost-metrics", daemon=True).start()
    return server


def run_worker(node: WorkerNode) -> None:
    """Serve until SIGTERM or SIGINT; then let running jobs finish and leave.

    Raises PrivilegeError when the node cannot become its `user`."""
    if node.options.user is not None:
        # As `serve --user`: the launcher stays root and forks every call;
        # the node that talks to the database and reads results does not.
        try:
            drop_to(node.options.user, node.plugins.sandbox_paths())
        except PrivilegeError:
            node.pool.close()
            node.plugins.close()
            raise
    address = node.options.metrics_address
    metrics = serve_metrics(node, address) if address else None
    beat = node.start()
    log.info(
        "worker node %s: %d slots, plugins %s",
        node.name,
        node.options.concurrency,
        ", ".join(f"{n}@{p['version']}" for n, p in sorted(node.inventory.items())),
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, node.stop)
        await node.serve()

    try:
        asyncio.run(main())
    finally:
        node.close(beat)
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
