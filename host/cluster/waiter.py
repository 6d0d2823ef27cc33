"""Futures for jobs that run on other nodes.

    worker: finish() -> NOTIFY plughost_job_finished '<job id>'
      v
    JobWaiter thread: LISTEN on its own connection -> read the job -> set its Future
      (every POLL_S it also reads the finished ones among the watched jobs, so a
       notification lost to a reconnect delays a result by POLL_S, never loses it)

A database outage stops nothing: the thread reconnects with a growing
pause, and the watched futures resolve once the jobs are finished.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

import psycopg

from host.cluster.pgstore import NOTIFY_CHANNEL, DatabaseUnavailable, PgJobStore
from host.services.store import Job

log = logging.getLogger("plughost.waiter")
POLL_S = 1.0
MAX_PAUSE_S = 5.0


class JobWaiter:
    """Resolves a Future per watched job when the job is finished."""

    def __init__(self, store: PgJobStore, url: str) -> None:
        self.store = store
        self.url = url
        self._lock = threading.Lock()
        self._futures: dict[str, list[Future[Job]]] = {}  # a job's waiters
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plughost-waiter", daemon=True)
        self._thread.start()

    def watch(self, job_id: str) -> Future[Job]:
        future: Future[Job] = Future()
        with self._lock:
            self._futures.setdefault(job_id, []).append(future)
        return future

    def _resolve(self, jobs: list[Job]) -> None:
        for job in jobs:
            with self._lock:
                futures = self._futures.pop(job.id, [])
            for future in futures:
                if future.set_running_or_notify_cancel():  # False: its waiter gave up
                    future.set_result(job)

    def _poll(self) -> None:
        with self._lock:
            watched = list(self._futures)
        if watched:
            self._resolve(self.store.finished_among(watched))

    def _listen(self) -> None:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self._poll()  # what finished while nobody listened
            while not self._stop.is_set():
                # notifies() yields each notification as it arrives and ends
                # after POLL_S; a job is resolved the moment its own arrives.
                for notice in conn.notifies(timeout=POLL_S):
                    with self._lock:
                        mine = notice.payload in self._futures
                    if mine:
                        self._resolve(self.store.finished_among([notice.payload]))
                    if self._stop.is_set():
                        break
                self._poll()

    def _run(self) -> None:
        pause = 0.1
        while not self._stop.is_set():
            try:
                self._listen()
                pause = 0.1
            except (psycopg.Error, DatabaseUnavailable) as exc:
                log.warning("job waiter lost the database, retrying in %.1fs: %s", pause, exc)
                self._stop.wait(pause)
                pause = min(MAX_PAUSE_S, pause * 2)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (within `timeout_s` plus one poll); unresolved futures stay pending."""
        self._stop.set()
        self._thread.join(timeout_s + POLL_S)
