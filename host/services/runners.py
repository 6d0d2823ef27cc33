"""Where stored jobs run: the small interface `JobManagementService` composes.

    JobManagementService (the records: admission, quota, store, reading, cancelling)
      |  runner.admit(plugin)      room for one more job, or refuse (503)
      |  store the job PENDING
      |  runner.submit(job id)  -> Future[Job], resolved when the job ends
      |  runner.follow(job id)  -> another Future of it (a retried request waits)
      v
    LocalPool: a bounded thread pool of this process; each thread calls
    JobManagementService.run_job(id, token), which runs the call and records
    its end (host/services/finished.py)

    ProcrastinateDispatch (host/cluster/dispatch.py): the job is deferred on
    its plugin's queue in the store's insert; a worker node runs it and
    records its end the same way; the future resolves when the row does.

A runner whose jobs run in this process (`in_process`) leaves their states
to the service: a waited job's input stays in memory until it ends, and a
PENDING job is cancelled in the store by the service. Any other runner
cancels where its jobs are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from host.errors import Overloaded, ShuttingDown
from host.services.store import Job


class CancelToken(Protocol):
    """What cancels one call (`PluginManagementService.cancellation()` gives one)."""

    def cancel(self) -> None: ...

    def close(self) -> None: ...


class JobRunner(Protocol):
    """Runs the jobs a `JobManagementService` stored."""

    @property
    def in_process(self) -> bool:
        """True: jobs run in this process, through `JobManagementService.run_job`."""

    def admit(self, plugin_name: str) -> None:
        """Take room for one more job of `plugin_name`. Raises a ServiceError
        (Overloaded, or the runner's own) when there is none; nothing is
        stored then."""

    def withdraw(self) -> None:
        """Give back the room of an admitted job that was not submitted."""

    def submit(self, job_id: str) -> Future[Job]:
        """Run the admitted, stored job `job_id`; the future resolves with it
        finished. Cancelling the future gives up on it, never the job's run."""

    def follow(self, job_id: str) -> Future[Job] | None:
        """A future of its own, resolved with the submitted job `job_id`
        when it ends (a retry of the request that created it waits on it);
        None when this runner no longer runs it (it ended, or it was never
        submitted here)."""

    def cancel(self, job: Job) -> None:
        """Stop `job`, PENDING or RUNNING as last read: a pending one never
        runs, a running one's sandbox is killed. Raises JobNotFound, JobFinished."""

    def retry_after(self) -> float:
        """Seconds a refused client should wait before it tries again."""

    def stats(self) -> dict[str, int]:
        """`workers`, `queue_size`, `running` and `queued`."""

    def nodes(self) -> list[dict[str, Any]]:
        """The nodes jobs run on; none when they run in this process."""

    def stop_starting(self) -> None:
        """Take no new job, and start none of those queued in this process."""

    def shutdown(self, timeout_s: float) -> None:
        """Stop taking jobs; give running ones `timeout_s` to finish."""


NOT_RUN = (
    "the host is shutting down: this job did not run; submit it again (one sent with an "
    "Idempotency-Key stays under its key and ends INTERRUPTED: send it with a new key)"
)
CLOSED = "the host is shutting down and takes no new job; submit it again"


def _follower(running: Future[Job]) -> Future[Job]:
    """A future of its own resolved as `running` ends: cancelling it gives up
    on the job, never cancels the job's run."""
    follower: Future[Job] = Future()
    running.add_done_callback(lambda done: _copy(done, follower))
    return follower


def _copy(done: Future[Job], follower: Future[Job]) -> None:
    """Resolve `follower` as `done` ended (unless its waiter gave up on it)."""
    if not follower.set_running_or_notify_cancel():
        return
    if done.cancelled():  # only the pool's shutdown cancels a queued run
        follower.set_exception(ShuttingDown(NOT_RUN))
    elif (error := done.exception()) is not None:
        follower.set_exception(error)
    else:
        follower.set_result(done.result())


class LocalPool:
    """Jobs run by `workers` threads of this process, at most `queue_size`
    waiting; a waiting job costs its id in memory. Thread-safe."""

    in_process = True

    def __init__(
        self,
        run: Callable[[str, CancelToken], Job],
        cancel_pending: Callable[[str], None],
        cancellation: Callable[[], CancelToken],
        workers: int = 2,
        queue_size: int = 32,
    ) -> None:
        """`run(job id, token)` runs a stored job in the calling thread and
        returns it finished; `cancel_pending(job id)` cancels it in the store
        if it is still PENDING; `cancellation()` gives each job its token."""
        self._run = run
        self._cancel_pending = cancel_pending
        self._cancellation = cancellation
        self.workers = workers
        self.queue_size = queue_size
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="plughost-job")
        self._slots = threading.BoundedSemaphore(workers + queue_size)
        self._lock = threading.Lock()
        self._tokens: dict[str, CancelToken] = {}
        self._futures: dict[str, Future[Job]] = {}
        self._running = 0
        self._in_flight = 0
        self._closed = False

    def admit(self, plugin_name: str) -> None:
        if self._closed:
            raise ShuttingDown(CLOSED)
        if not self._slots.acquire(blocking=False):
            raise Overloaded(retry_after_s=self.retry_after())

    def withdraw(self) -> None:
        self._slots.release()

    def submit(self, job_id: str) -> Future[Job]:
        token = self._cancellation()
        with self._lock:  # the job's run forgets it only after this
            if self._closed:
                # Admitted before the shutdown began, handed over after
                # `stop_starting` looked: it never starts, as a queued one.
                token.close()
                self._slots.release()
                refused: Future[Job] = Future()
                refused.set_running_or_notify_cancel()
                refused.set_exception(ShuttingDown(NOT_RUN))
                return refused
            self._tokens[job_id] = token
            self._in_flight += 1
            try:
                future = self._pool.submit(self._run_pooled, job_id, token)
            except BaseException:
                self._tokens.pop(job_id, None)
                self._in_flight -= 1
                token.close()
                raise
            self._futures[job_id] = future  # followed from its submission on
        # The caller's own: a wait's deadline cancels what it awaited.
        return _follower(future)

    def follow(self, job_id: str) -> Future[Job] | None:
        with self._lock:
            running = self._futures.get(job_id)
        if running is None:
            return None
        return _follower(running)

    def _run_pooled(self, job_id: str, token: CancelToken) -> Job:
        with self._lock:
            # A queued run a worker took as `stop_starting` began, before it
            # could cancel it: it never starts either.
            started = not self._closed
            self._running += started
        try:
            if not started:
                raise ShuttingDown(NOT_RUN)
            return self._run(job_id, token)
        finally:
            with self._lock:
                self._running -= started
            self._forget(job_id)
            token.close()
            self._slots.release()

    def stop_starting(self) -> None:
        """Shutting down: no new job is taken, the runs still queued never
        start, and whoever follows one hears so now (`ShuttingDown`), not
        once the running ones are done."""
        with self._lock:
            self._closed = True
            queued = dict(self._futures)
        for job_id, future in queued.items():
            if not future.cancel():  # it runs: it is given its time
                continue
            with self._lock:  # a cancelled future cancels again: one caller releases
                if self._futures.pop(job_id, None) is not future:
                    continue
                token = self._tokens.pop(job_id, None)
                self._in_flight -= 1
            if token is not None:
                token.close()
            self._slots.release()

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._tokens.pop(job_id, None)
            self._futures.pop(job_id, None)
            self._in_flight -= 1

    def cancel(self, job: Job) -> None:
        self._cancel_pending(job.id)
        with self._lock:
            token = self._tokens.get(job.id)
        if token is not None:
            token.cancel()

    def retry_after(self) -> float:
        # A rough wait: one typical call per queued job per worker.
        return max(1.0, round(self.queue_size / max(self.workers, 1), 1))

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "workers": self.workers,
                "queue_size": self.queue_size,
                "running": self._running,
                "queued": self._in_flight - self._running,
            }

    def nodes(self) -> list[dict[str, Any]]:
        return []

    def shutdown(self, timeout_s: float) -> None:
        """Start none of the jobs still waiting (their records stay PENDING,
        for the job service to mark INTERRUPTED: their clients never
        cancelled them), give running ones `timeout_s`, then kill their
        sandboxes; wait for every thread."""
        deadline = time.monotonic() + timeout_s
        self.stop_starting()
        while self.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:  # what runs now: nothing starts after stop_starting
            tokens = dict(self._tokens)
        for token in tokens.values():
            token.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
