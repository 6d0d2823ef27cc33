"""JobManagementService: job records; where jobs run is its runner's.

    enqueue(plugin, payload, owner)
      |  PluginManagementService.check (refuse bad input, unknown, quarantined)
      |  runner.admit: a pool slot, or raise Overloaded (503 + Retry-After)
      |  in ONE hold on the store (a lock, or a transaction holding the
      |  owner's lock: one quota for every API node on a database):
      |    owner's quota: its oldest finished jobs make room, or (its
      |    unfinished jobs alone fill it) raise QuotaExceeded (429)
      |    store the job PENDING with its input (committed before anyone hears of it)
      v
    runner.submit(job id): LocalPool's queue holds the id only
      v
    pool thread: run_job(id) -> RUNNING, input read from the store
      -> PluginManagementService.execute_plugin
      -> record_finished: SUCCESS | FAILED | CANCELLED, result or public
         error stored, input dropped

With the default `LocalPool` (host/services/runners.py), at most `workers`
sandboxes run at once and at most `queue_size` jobs wait; nothing piles up
beyond that, and a waiting job costs its id in memory, not its input. A
multi-node deployment composes `ProcrastinateDispatch` instead
(host/cluster/dispatch.py): worker nodes run the jobs and record their ends
the same way (host/services/finished.py). Each job belongs to an owner (a
principal id); reading, listing and cancelling take the owner whose jobs
may be seen (None: every owner). What is stored is bounded by `JobLimits`:
jobs and bytes per owner, bytes per listing page, age and total size of the
database. The only execution path is `PluginManagementService.execute_plugin`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from host.errors import (
    Envelope,
    JobFinished,
    JobNotFound,
    QuotaExceeded,
    Rejected,
    ShuttingDown,
    envelope,
)
from host.services.batchrows import BatchRows, job_ended
from host.services.callbacks import CallbackService
from host.services.finished import input_gone, record_finished
from host.services.idempotency import replayed, request_digest
from host.services.jobrows import Admit, Idempotency, Rows, prune_owner
from host.services.plugins import PluginManagementService
from host.services.runners import NOT_RUN, CancelToken, JobRunner, LocalPool
from host.services.store import (
    ANONYMOUS,
    FINISHED,
    Job,
    JobPage,
    JobStatus,
    JobStore,
    MemoryJobStore,
    Usage,
    now_iso,
)

log = logging.getLogger("plughost.jobs")
PRUNE_EVERY_S = 60.0
MiB = 1024 * 1024
# Pruning by size goes this far below the cap, so it does not run on every job.
PRUNE_TO_FRACTION = 0.9
# A client over its job quota drops its oldest finished jobs down to
# max_jobs_per_client - max_jobs_per_client // QUOTA_STEP - 1 (for the new one).
QUOTA_STEP = 64

# How long a retry waits for the request that stored its job to hand it to the
# runner (microseconds, unless that request's thread is starved).
HANDOVER_WAIT_S = 10.0
SHUT_DOWN = "the host shut down before this job finished"


@dataclass
class _Waited:
    """A job of `run_waited` the store has not heard of yet (unless `recorded`)."""

    job: Job  # as it is now
    payload: Any
    recorded: bool = False
    # Its owner's quota, checked on the store as it starts, or as it is
    # recorded if that comes first; None once checked.
    quota: Admit | None = None


@dataclass(frozen=True)
class JobLimits:
    """What the job store may hold (the settings of the same names in
    `host.config.Settings`, where each is documented)."""

    retention_s: float = 7 * 24 * 3600
    max_jobs_per_client: int = 1000
    max_stored_bytes_per_client: int = 256 * MiB
    max_list_bytes: int = 4 * MiB
    max_db_bytes: int = 1024 * MiB


def _exceeded(
    usage: Usage, incoming: int, limits: JobLimits, count: int = 1, running: int = 0
) -> tuple[str, int, int] | None:
    """The quota `count` more jobs of `incoming` bytes in all would break,
    beside `running` jobs of the owner not stored yet, as `(name, limit,
    used)`; None when they fit."""
    if usage.jobs + running + count > limits.max_jobs_per_client:
        return "max_jobs_per_client", limits.max_jobs_per_client, usage.jobs + running
    if usage.stored_bytes + incoming > limits.max_stored_bytes_per_client:
        return "max_stored_bytes_per_client", limits.max_stored_bytes_per_client, usage.stored_bytes
    return None


def _input_bytes(payload: Any) -> int:
    """About what `payload` will take in the store (a base64 image shrinks by 1/4)."""
    if not isinstance(payload, dict):
        return 0
    image = payload.get("image", b"")
    size = len(image) * 3 // 4 if isinstance(image, str) else len(image)
    return size + len(repr(payload.get("options"))) + len(str(payload.get("mime_type")))


def _done(job: Job) -> tuple[Job, Future[Job]]:
    """`job` with a future that is done already: a job an idempotency key holds."""
    future: Future[Job] = Future()
    future.set_result(job)
    return job, future


class JobManagementService:
    """Creates, runs, lists and cancels jobs; thread-safe. Where jobs run is
    its `runner`'s (host/services/runners.py): by default a `LocalPool` of
    `workers` threads and `queue_size` waiting jobs."""

    def __init__(
        self,
        plugins: PluginManagementService,
        store: JobStore | None = None,
        workers: int = 2,
        queue_size: int = 32,
        limits: JobLimits | None = None,
        runner: JobRunner | None = None,
    ) -> None:
        self._plugins = plugins
        self.store: JobStore = store or MemoryJobStore()
        self.limits = limits or JobLimits()
        self.runner: JobRunner = runner or LocalPool(
            self._run_submitted, self._cancel_pending, plugins.cancellation, workers, queue_size
        )
        self._lock = threading.Lock()
        # Jobs handed to an in-process runner and not back from it, by id ->
        # owner (under their own lock, which is never held across other
        # work: the event loop takes it).
        self._flying: dict[str, str] = {}
        self._flying_lock = threading.Lock()
        self._waited: dict[str, _Waited] = {}  # run_waited's jobs not finished yet
        # Keyed jobs stored and not yet handed to the runner: set once handed.
        self._handing: dict[str, threading.Event] = {}
        self._last_prune = 0.0
        self.closed = False  # shutdown() began: nothing more runs
        self.stopping = False  # stop_starting() began: nothing more starts here
        # Completion callbacks (host/services/callbacks.py); None: not offered.
        self.callbacks: CallbackService | None = None
        plugins.metrics.gauge(
            "plughost_queue_depth", "Jobs waiting for a sandbox.", lambda: self.stats()["queued"]
        )
        plugins.metrics.gauge(
            "plughost_sandboxes_running", "Sandboxes running now.", lambda: self.stats()["running"]
        )
        recovered = self.store.recover(
            envelope("interrupted", "the host stopped before this job finished")["error"]
        )
        if recovered:
            log.warning("marked %d unfinished jobs of a previous run INTERRUPTED", recovered)

    # -- creating -----------------------------------------------------------

    def create_job(self, plugin_name: str, payload: Any, owner: str = ANONYMOUS) -> Job:
        """Validate and store a PENDING job of `owner` (SPEC section 7); `run_job`
        runs it. Raises Rejected, QuotaExceeded."""
        self._plugins.check(plugin_name, payload)
        return self._store_pending(plugin_name, payload, owner)[0]

    @staticmethod
    def _pending(plugin_name: str, owner: str) -> Job:
        return Job(
            id=uuid.uuid4().hex,
            plugin=plugin_name,
            status=JobStatus.PENDING,
            created_at=now_iso(),
            owner=owner,
        )

    def _store_pending(
        self,
        plugin_name: str,
        payload: Any,
        owner: str,
        idem: Idempotency | None = None,
        callback_url: str | None = None,
    ) -> tuple[Job, bool]:
        """Store a new PENDING job (and its callback), its owner's quota
        checked in the insert's own hold on the store; `(it, True)`, or `(the
        job its owner stored under idem's key, False)` when the store refuses
        a second one."""
        job = self._pending(plugin_name, owner)
        if callback_url is not None and self.callbacks is not None:
            # Before the job, so a stored job never lacks its callback; one
            # whose job never came (refused, or the host died between the
            # two) is swept (callbackstore.py).
            self.callbacks.register(owner, "job", job.id, callback_url)
        if idem is not None:  # a retry may find it stored before it is handed over
            with self._lock:
                self._handing[job.id] = threading.Event()
        try:
            held = self.store.add(job, payload, idem, self._quota(owner, _input_bytes(payload)))
        except BaseException:
            self._handed(job.id)
            raise
        if held is not None and idem is not None:
            self._handed(job.id)
            return replayed(held, idem), False
        log.info("job accepted", extra={"job_id": job.id, "plugin": plugin_name})
        return job, True

    def admit_batch(self, rows: BatchRows, owner: str, incoming: int, count: int) -> None:
        """Make room for a batch of `count` jobs of `owner`, `incoming` bytes
        in all, on the rows that will store it (the owner's hold taken first:
        one quota for every API node). Raises QuotaExceeded."""
        rows.hold_owner(owner)
        self._check_quota(rows.jobs, owner, incoming, count)

    def _running_in_memory(self, owner: str) -> int:
        """`owner`'s waited jobs that started and are not stored yet: each
        is stored as it ends, so each takes a job's room (`_check_quota`)."""
        waited = list(self._waited.values())  # one C-level copy: no lock needed
        return sum(1 for w in waited if w.job.owner == owner and w.quota is None and not w.recorded)

    def _quota(self, owner: str, incoming: int) -> Admit:
        """The check of `owner`'s quota the store runs before inserting a
        job of `incoming` bytes, on the rows it holds for the insert (so
        every API node on one database enforces one quota)."""
        return lambda rows: self._check_quota(rows, owner, incoming)

    def _check_quota(self, rows: Rows, owner: str, incoming: int, count: int = 1) -> None:
        """Make room for `count` more jobs of `owner` of `incoming` bytes in
        all: a client keeps its newest jobs, the oldest finished ones go.
        Its analyses running in memory count as the jobs they will be stored
        as. Raise QuotaExceeded when its unfinished jobs alone leave no room."""
        limits = self.limits
        running = self._running_in_memory(owner)
        if _exceeded(rows.usage(owner), incoming, limits, count, running) is None:
            return
        # A client at its job quota would otherwise drop one job (and pay a
        # search and a delete) for every new one: room is made for a
        # 64th of the quota at once.
        step = limits.max_jobs_per_client // QUOTA_STEP
        keep = limits.max_jobs_per_client - count - running - step
        room = limits.max_stored_bytes_per_client - incoming
        pruned = prune_owner(rows, owner, max(keep, 0), max(room, 0))
        if pruned:
            log.info("quota: dropped %d oldest finished jobs", pruned, extra={"owner": owner})
        exceeded = _exceeded(rows.usage(owner), incoming, limits, count, running)
        if exceeded is None:
            return
        # What is left are unfinished jobs (they end soon), or one input larger
        # than the whole byte quota.
        quota, limit, used = exceeded
        log.warning("quota %s reached", quota, extra={"owner": owner, "used": used})
        raise QuotaExceeded(quota, limit, used, retry_after_s=self.runner.retry_after())

    def enqueue(
        self,
        plugin_name: str,
        payload: Any,
        owner: str = ANONYMOUS,
        key: str | None = None,
        callback_url: str | None = None,
    ) -> tuple[Job, Future[Job]]:
        """Create a job of `owner` and hand its id to the runner.

        With a `callback_url`, checked against the destination policy of
        `callbacks` first (Rejected when refused, or when callbacks are off),
        the job's public view is POSTed there once it ends (host/services/callbacks.py).

        With an idempotency `key` that `owner` used before (its job not
        pruned yet), nothing is created: the job of that key is returned as
        it is now, with a future of its end (done already if it is
        finished). Raises Rejected, Overloaded,
        QuotaExceeded or IdempotencyConflict (the key's job was created by
        a different request), or the runner's own refusal; stores nothing then.
        """
        if callback_url is not None:
            self.check_callback(callback_url)
        return self._queue(plugin_name, payload, owner, False, key, callback_url)

    def check_callback(self, url: str) -> None:
        """Raises Rejected (`invalid_input`, field `callback_url`) unless
        `url` may be a callback destination of this host: callbacks are
        off, or the destination policy refuses it."""
        if self.callbacks is None:
            raise Rejected(
                envelope(
                    "invalid_input",
                    "callbacks are not enabled on this host",
                    field="callback_url",
                )
            )
        self.callbacks.check(url)

    def run_waited(
        self, plugin_name: str, payload: Any, owner: str = ANONYMOUS, key: str | None = None
    ) -> tuple[Job, Future[Job]]:
        """Queue a job of `owner` whose caller waits for its end (`POST
        /v1/analyze`). It runs as any other job, but the store first hears of
        it when it ends: one commit on the way to the answer instead of
        three. If the caller stops waiting before then, `record_waited`
        stores it as it is, and it goes on as any other job.

        Until one of those, the job's id is known to no one but the caller
        (and its input stays in memory, as the caller's request holds it
        anyway): a host that dies meanwhile leaves no record, and the caller
        no answer. A runner whose jobs run elsewhere (not `in_process`), or
        a job with an idempotency `key` (the store must hold the key before
        the job runs), gets it recorded and queued as any other; a known
        key is answered as by `enqueue`. Raises what `enqueue` raises.
        """
        return self._queue(plugin_name, payload, owner, self.waits_in_memory(key), key)

    def waits_in_memory(self, key: str | None) -> bool:
        """Whether `run_waited` keeps a job with this idempotency `key` in
        memory alone until it starts: then it does no store work, and its
        caller may call it from an event loop (its owner's quota is checked
        on the store by the thread that starts it, `_start`)."""
        return self.runner.in_process and key is None

    def _queue(
        self,
        plugin_name: str,
        payload: Any,
        owner: str,
        waited: bool,
        key: str | None,
        callback_url: str | None = None,
    ) -> tuple[Job, Future[Job]]:
        self._plugins.check(plugin_name, payload)
        idem = None
        if key is not None:
            idem = Idempotency(key, request_digest(plugin_name, payload, callback_url))
        if idem is not None and (held := self.store.keyed(owner, idem.key)) is not None:
            # A retry: no slot, no quota, nothing stored.
            return self._following(replayed(held, idem))
        self._refuse_past_quota_in_flight(owner)
        self.runner.admit(plugin_name)
        job = None
        try:
            if waited:
                job = self._pending(plugin_name, owner)
                quota = self._quota(owner, _input_bytes(payload))
                # Without the lock: other threads hold it during store writes
                # (`_start`, `record_waited`, `_write_finished`), and this may
                # run on the event loop. No other thread knows the id before
                # `submit`, and one dict operation is atomic.
                self._waited[job.id] = _Waited(job, payload, quota=quota)
            else:
                job, stored = self._store_pending(plugin_name, payload, owner, idem, callback_url)
                if not stored:  # a racing request with the same key stored it first
                    self.runner.withdraw()
                    return self._following(job)
            self._took_off(job.id, owner)
            try:
                future = self.runner.submit(job.id)
            finally:
                self._handed(job.id)
        except BaseException:
            if job is not None:
                self._landed(job.id)
                self._waited.pop(job.id, None)  # not submitted: no other thread knows it
            self.runner.withdraw()
            raise
        if not waited:  # a waited job's thread prunes as it starts (`_start`)
            self._maybe_prune()
        return job, future

    def _refuse_past_quota_in_flight(self, owner: str) -> None:
        """QuotaExceeded when `owner` has as many jobs as its job quota allows
        queued or running here already: each will be stored unfinished or
        as it ends, so the next cannot fit. Checked before a queue place is
        taken, without the store: an analysis's full check runs only as it
        starts (`_start`), and until then a client over its quota held a
        place in the queue with each request, which other clients' jobs
        were then refused for (503)."""
        if not self.runner.in_process:
            return
        with self._flying_lock:  # at most the pool's workers and queue
            flying = sum(1 for flier in self._flying.values() if flier == owner)
        limit = self.limits.max_jobs_per_client
        if flying >= limit:
            raise QuotaExceeded(
                "max_jobs_per_client", limit, flying, retry_after_s=self.runner.retry_after()
            )

    def _took_off(self, job_id: str, owner: str) -> None:
        """`job_id` of `owner` is being handed to the runner (counted before
        the hand-over: its run may end before `submit` returns)."""
        with self._flying_lock:
            self._flying[job_id] = owner

    def _landed(self, job_id: str) -> None:
        """`job_id` is back from the runner (its run returned or raised), or
        was never handed to it."""
        with self._flying_lock:
            self._flying.pop(job_id, None)

    def _following(self, job: Job) -> tuple[Job, Future[Job]]:
        """A job an idempotency key holds, and a future of its end, as the
        request that created it has: done already once it is finished, or
        when the runner does not run it (it ended since it was read, or it
        is not submitted yet), with the job as it is now."""
        if job.status in FINISHED:
            return _done(job)
        with self._lock:
            handing = self._handing.get(job.id)
        if handing is not None:  # stored by a request still handing it over
            handing.wait(HANDOVER_WAIT_S)
        future = self.runner.follow(job.id)
        if future is None:
            now = self.get_job(job.id)
            if self.stopping and now.status is JobStatus.PENDING:
                # Dropped as the host stopped starting jobs (it ends INTERRUPTED):
                # answered as the request that queued it was.
                raise ShuttingDown(NOT_RUN)
            return _done(now)
        return job, future

    def _handed(self, job_id: str) -> None:
        """The request that stored keyed job `job_id` is done handing it
        over (or failed to): retries waiting for it go on."""
        if job_id not in self._handing:  # not keyed: no lock taken (the event loop's case)
            return
        with self._lock:
            handing = self._handing.pop(job_id, None)
        if handing is not None:
            handing.set()

    def _start(self, job_id: str) -> tuple[Job, _Waited | None]:
        """Mark a PENDING job RUNNING (a waited one the store has not heard
        of, in memory only, once its owner's quota allows it: else raises
        QuotaExceeded); return it, or it as it is if it is not PENDING."""
        with self._lock:
            waited = self._waited.get(job_id)
            stored = waited is None or waited.recorded
            job = self.get_job(job_id) if waited is None or stored else waited.job
            if job.status is not JobStatus.PENDING:
                self._waited.pop(job_id, None)
                return job, None
            if waited is not None and waited.quota is not None:
                try:
                    self.store.check(waited.quota)
                except QuotaExceeded:
                    # Gone at once: a wait ending now must not record it.
                    del self._waited[job_id]
                    raise
                waited.quota = None
            job = replace(job, status=JobStatus.RUNNING, started_at=now_iso())
            if stored:
                self.store.update(job)
            if waited is not None:
                waited.job = job
        return job, waited

    def record_waited(self, job_id: str) -> Job | None:
        """Store a job of `run_waited` as it is now, because its caller stops
        waiting; return it, or None once it had ended (and was stored), or
        when it was stored from the start (a runner not `in_process`)."""
        with self._lock:
            waited = self._waited.get(job_id)
            if waited is None:
                return None
            if not waited.recorded:
                try:  # with its owner's quota, unless it started (and was checked)
                    self.store.add(waited.job, waited.payload, None, waited.quota)
                except QuotaExceeded:
                    del self._waited[job_id]  # it never starts
                    raise
                waited.recorded, waited.quota = True, None
            return waited.job

    # -- running ------------------------------------------------------------

    def _run_submitted(self, job_id: str, token: CancelToken) -> Job:
        try:
            return self.run_job(job_id, token)
        finally:
            with self._lock:
                self._waited.pop(job_id, None)  # if its run failed outright
            self._landed(job_id)

    def run_job(self, job_id: str, cancel: Any = None) -> Job:
        """Run a PENDING job in this thread; return it finished. Raises
        JobNotFound, QuotaExceeded (a waited job its owner has no room for)."""
        job, waited = self._start(job_id)
        if job.status is not JobStatus.RUNNING:
            return job  # cancelled while queued, or run already
        if waited is not None and not waited.recorded:
            self._maybe_prune()
        log.info("job started", extra={"job_id": job.id, "plugin": job.plugin})
        started = time.monotonic()
        payload = waited.payload if waited is not None else self.store.payload(job.id)
        if payload is None:
            outcome = input_gone(job.plugin)
        else:
            outcome = self._plugins.execute_plugin(
                job.plugin, payload, cancel=cancel, owner=job.owner
            )
        del payload  # not kept while the result is stored
        if self.closed and outcome[1] and Envelope.of(outcome[1]).reason == "cancelled":
            # Its sandbox killed by `shutdown` once its time was up: not a
            # client's cancel, ended as every job a stopped host did not finish.
            outcome = {}, envelope("interrupted", SHUT_DOWN, job.plugin)
        elapsed_ms = (time.monotonic() - started) * 1000
        final = record_finished(job, outcome, elapsed_ms, self._write_finished, ended=self._ended)
        if self.callbacks is not None:
            self.callbacks.wake()
        return final

    def _ended(self, job: Job) -> None:
        """A job ended (and is stored): the end of its batch, if it was the
        last item (its callback then due: the deliverer is woken)."""
        if job_ended(self.store, job.id) and self.callbacks is not None:
            self.callbacks.wake()

    def _write_finished(self, job: Job) -> bool:
        with self._lock:
            waited = self._waited.pop(job.id, None)
            if waited is not None and not waited.recorded:
                self.store.add(job, None)  # its only commit
            else:
                self.store.update(job)
        return True

    # -- reading and cancelling ---------------------------------------------

    def get_job(self, job_id: str, owner: str | None = None) -> Job:
        """The job with that id, if `owner` (None: anyone) owns it.

        Raises JobNotFound, the same for another owner's job as for no job.
        """
        job = self.store.get(job_id)
        if job is None or (owner is not None and job.owner != owner):
            raise JobNotFound(job_id)
        return job

    def job_document(self, job_id: str, owner: str | None = None) -> str:
        """The job's public document, serialized, if `owner` (None: anyone) owns it.

        Cheaper than `get_job(...).public()` for a large result: it is not parsed.
        Raises JobNotFound, the same for another owner's job as for no job.
        """
        found = self.store.document(job_id)
        if found is None or (owner is not None and found[0] != owner):
            raise JobNotFound(job_id)
        if self.callbacks is None:
            return found[1]
        return self.callbacks.document("job", job_id, found[1])

    def list_jobs(
        self,
        owner: str | None = None,
        status: JobStatus | None = None,
        plugin: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> JobPage:
        """A page of `owner`'s jobs (None: everyone's), newest first, serialized;
        at most `limit` jobs and `JobLimits.max_list_bytes` bytes (one job at
        least), each with its callback's view if it has one (a few hundred
        bytes more per callback, not counted against the cap)."""
        page = self.store.page(owner, status, plugin, limit, offset, self.limits.max_list_bytes)
        if self.callbacks is None:
            return page
        return replace(page, documents=self.callbacks.documents("job", page.documents))

    def cancel_job(self, job_id: str, owner: str | None = None, wait_s: float = 5.0) -> Job:
        """Cancel a pending job, or kill the sandbox of a running one, if `owner`
        (None: anyone) owns it.

        Returns the job, CANCELLED once the sandbox is gone (or still RUNNING
        if it did not stop within `wait_s`). Raises JobNotFound, JobFinished.
        """
        job = self.get_job(job_id, owner)
        if job.status in FINISHED:
            raise JobFinished(job_id, job.status.value)
        self.runner.cancel(job)
        log.info("job cancel requested", extra={"job_id": job_id, "plugin": job.plugin})
        deadline = time.monotonic() + wait_s
        job = self.get_job(job_id)
        while job.status not in FINISHED and time.monotonic() < deadline:
            time.sleep(0.01)  # whoever runs it records the outcome
            job = self.get_job(job_id)
        if job.status in FINISHED:  # a job cancelled before it ran ends here
            self._ended(job)
        return job

    def _cancel_pending(self, job_id: str) -> None:
        """Mark the job CANCELLED if it is still PENDING (it then never runs):
        for a runner `in_process`, whose jobs start in `_start`."""
        with self._lock:
            job = self.store.get(job_id)
            if job is None or job.status is not JobStatus.PENDING:
                return
            error = envelope("cancelled", "job was cancelled before it ran", plugin=job.plugin)
            self.store.update(
                replace(
                    job,
                    status=JobStatus.CANCELLED,
                    finished_at=now_iso(),
                    error=error["error"],
                )
            )

    # -- housekeeping -------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        """The nodes of a multi-node deployment; a single node has none."""
        return self.runner.nodes()

    def stats(self) -> dict[str, int]:
        """`workers`, `queue_size`, `running` and `queued`, from the runner."""
        return self.runner.stats()

    def _maybe_prune(self) -> None:
        """Drop finished jobs past retention (once a minute) and, when the
        store is over `max_db_bytes`, the oldest finished ones."""
        now = time.monotonic()
        if now - self._last_prune >= PRUNE_EVERY_S:
            self._last_prune = now
            retention = self.limits.retention_s
            pruned = self.store.prune(retention)
            if pruned:
                log.info("pruned %d finished jobs older than %.0f s", pruned, retention)
        if self.store.size_bytes() > self.limits.max_db_bytes:
            target = int(self.limits.max_db_bytes * PRUNE_TO_FRACTION)
            pruned = self.store.prune_to_size(target)
            # Nothing to prune means only unfinished jobs are left: the queue bounds those.
            log.log(
                logging.WARNING if pruned else logging.DEBUG,
                "job store over %d bytes: pruned %d oldest finished jobs",
                self.limits.max_db_bytes,
                pruned,
            )

    def stop_starting(self) -> None:
        """The server began to stop: take no new job and start none still
        queued here (their waiting requests are answered `shutting_down` at
        once; their records, PENDING, are marked INTERRUPTED by `shutdown`);
        running jobs go on until `shutdown`."""
        self.stopping = True
        self.runner.stop_starting()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop taking jobs; let running ones finish within `timeout_s`, then
        cancel (the runner's `shutdown`). Jobs of this process still pending
        or running afterwards are marked INTERRUPTED. Callbacks stop being
        delivered (those still due go out after the next start). A second
        call does nothing."""
        if self.closed:
            return
        self.closed = self.stopping = True
        self.runner.shutdown(timeout_s)
        if self.callbacks is not None:
            self.callbacks.stop()
        self.store.recover(envelope("interrupted", SHUT_DOWN)["error"])
        self.store.close()
