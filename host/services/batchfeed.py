"""How a batch's items reach a single node's pool: a few at a time, in turn.

    BatchService.create ──add(batch)──▶ lanes: one per batch, its job ids in order,
                                          │  grouped by the batch's owner
                                          │  the feeder thread, while batch items in
                                          │  the pool < the pool's workers:
                                          │    next owner in turn -> its next lane in
                                          │    turn -> that lane's next job id
                                          │    runner.admit (a pool slot; none: wait)
                                          ▼    runner.submit(job id)
    LocalPool's FIFO queue ◀── other clients' jobs, submitted as they come

The pool runs jobs in the order they were submitted. Were a batch's items
all submitted at once, a job submitted after a batch of 100 would wait for
all 100 (and a batch larger than the pool's queue would not fit at all).
Fed like this, at most `workers` of all batches' items are in the pool at
once: a job submitted after a batch waits for the items already running,
not for the batch. Clients take turns, and each client's batches take
turns within its own: a client with a hundred batches gets no more of the
pool than another client with one.

The items wait in the store as PENDING jobs; the lanes hold their ids only.
A cancelled item still goes through the pool, where it ends at once (not
PENDING any more). The thread starts with the first batch and ends when no
lane is left, or when the service stops starting jobs (its pending jobs end
INTERRUPTED there, as every job of a stopped host).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any

from host.errors import Overloaded, ShuttingDown
from host.services.jobs import JobManagementService

log = logging.getLogger("plughost.batches")
# How long the feeder waits for a pool slot before it asks again.
SLOT_WAIT_S = 0.05


class BatchFeeder:
    """Feeds the items of batches to `jobs`' in-process runner, in turn. Thread-safe."""

    def __init__(self, jobs: JobManagementService) -> None:
        self._jobs = jobs
        self._changed = threading.Condition()
        # owner: {batch id: (plugin, job ids)}, both in turn order.
        self._lanes: dict[str, dict[str, tuple[str, deque[str]]]] = {}
        self._in_pool = 0
        self._thread: threading.Thread | None = None

    def add(self, batch_id: str, plugin: str, job_ids: list[str], owner: str) -> None:
        """Queue the items `job_ids` (stored PENDING) of `owner`'s new batch."""
        with self._changed:
            self._lanes.setdefault(owner, {})[batch_id] = (plugin, deque(job_ids))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._feed, name="plughost-batch-feed", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()

    def drop(self, batch_id: str) -> int:
        """Stop feeding the batch; return how many of its items were never fed."""
        with self._changed:
            for owner, lanes in list(self._lanes.items()):
                if batch_id in lanes:
                    _, left = lanes.pop(batch_id)
                    if not lanes:
                        del self._lanes[owner]
                    return len(left)
            return 0

    def waiting(self) -> int:
        """Items not fed yet, of every batch."""
        with self._changed:
            return sum(len(ids) for lanes in self._lanes.values() for _, ids in lanes.values())

    def _next(self) -> tuple[str, str, str, str] | None:
        """`(owner, batch id, plugin, job id)` of the next owner's next
        lane's next item, that owner and that lane moved to the end; None
        when there is no lane. Called locked."""
        owner = next(iter(self._lanes), None)
        if owner is None:
            return None
        lanes = self._lanes.pop(owner)
        batch_id = next(iter(lanes))
        plugin, ids = lanes.pop(batch_id)
        job_id = ids.popleft()
        if ids:
            lanes[batch_id] = (plugin, ids)
        if lanes:
            self._lanes[owner] = lanes
        return owner, batch_id, plugin, job_id

    def _put_back(self, owner: str, batch_id: str, plugin: str, job_id: str) -> None:
        """An item not fed after all goes first again (its owner and its
        lane keep their turn)."""
        with self._changed:
            lanes = self._lanes.pop(owner, {})
            _, ids = lanes.pop(batch_id, (plugin, deque()))
            ids.appendleft(job_id)
            self._lanes = {owner: {batch_id: (plugin, ids), **lanes}, **self._lanes}

    def _take(self) -> tuple[str, str, str, str] | None:
        """Wait for room in the pool; the next item, or None when the
        feeder has nothing left (its thread then ends)."""
        with self._changed:
            while True:
                if not self._lanes or self._jobs.stopping:
                    self._lanes.clear()
                    self._thread = None
                    return None
                room = max(1, self._jobs.stats()["workers"]) - self._in_pool
                if room > 0:
                    found = self._next()
                    if found is not None:
                        self._in_pool += 1
                        return found
                self._changed.wait(SLOT_WAIT_S)

    def _feed(self) -> None:
        runner = self._jobs.runner
        while (found := self._take()) is not None:
            owner, batch_id, plugin, job_id = found
            try:
                runner.admit(plugin)
            except ShuttingDown:
                # The host stopped starting jobs since `_take` looked: this
                # item and the others not fed stay PENDING (INTERRUPTED at
                # shutdown, as every pending job of a stopped host).
                self._fed_one(None)
                continue
            except Overloaded:
                # The pool's queue is full of other jobs: this item waits its turn.
                self._fed_one(None)
                self._put_back(owner, batch_id, plugin, job_id)
                with self._changed:
                    self._changed.wait(SLOT_WAIT_S)
                continue
            try:
                future = runner.submit(job_id)
            except RuntimeError:
                # The pool shut down between the admission and the submission:
                # the host is stopping, and its pending jobs end INTERRUPTED.
                runner.withdraw()
                self._fed_one(None)
                continue
            future.add_done_callback(self._fed_one)

    def _fed_one(self, future: Future[Any] | None) -> None:
        """An item left the pool (ended, or was never fed): room for the next."""
        with self._changed:
            self._in_pool -= 1
            self._changed.notify_all()
