"""Prewarmed children: forked and set up before a call, waiting for its payload (host).

`WarmPool` keeps up to `size` handles (`sandbox.handle.ChildHandle`) per key
(a plugin with its limits) whose children are set up and waiting, hands one
to a call (`take`) and starts replacements in one background thread
(`fill`). Each still serves exactly one call. Plugin code runs only inside
a call's deadline, or in the import before it: a child with a uid of its
own imports its plugin while it waits, and its keeper then stops the whole
call (every process and thread: whatever the import started) until the
hand-over; a child without one imports its plugin only after the hand-over
(`sandbox.child`)::

    fill(key, start)     starter thread: start() -> handle, in _waiting
    keeper thread        poll: each waiting handle's reply pipe, payload socket,
                         stopper's answer and status pipe, until the next
                         handle's time is up; never waits on one handle
        ready frame          set up: its import begins (the frame is left for the call)
        "w" on the socket    plugin imported -> handle.begin_stop(): the
                             launcher's stopper stops the whole call
        stopper's b"1"       every thread stopped -> ready for a call
        anything else on     put away
          either of them
        time up              put away: WARM_IDLE_S after its fork; its plugin's
                             timeout after its import began; STOP_WAIT_S
                             after its stop was asked for
        status pipe          it died -> put away
    take(key)            a stopped handle; run_call's hand_over continues it
                         (a call arrived: `Pacing` counts it)
    fill(key, start)     skipped while `Pacing` says the key's calls arrive
                         faster than a child of it is prepared
    close()              the keeper stopped and joined, the starter shut
                         down, every handle put away

The keeper runs only while there is a handle to keep, and closes its wake-up
pipe when it ends: an idle pool holds no thread and no descriptor.

Under sustained load a warm child costs more than it saves: a call that
finds none pays a cold start while the pool prepares the next child beside
it, and a warm call's hand-over (the keeper, the stop, the continue) is
dearer than a cold start. `Pacing` follows, per key, the mean time between
its calls and the mean time a child of it takes from its fork until it is
ready (stopped); while calls come faster than that, `fill` starts none, and
the first call after the rate drops starts one again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sandbox.handle import PID_GRACE_S, STOP_WAIT_S, ChildHandle

WARM_IDLE_S = 30.0  # a warm child unused this long after its fork is put away
# A replacement asked for as a call begins is started once that call has its
# verdict, or this long after it was asked for, whichever comes first: started
# at once, its host share held the interpreter and its fork the launcher while
# a short call's reply waited (a warm call's p50 went from 0.9 to 1.5 ms),
# while a long call still has its successor prepared beside it.
FILL_DELAY_S = 0.005
# Weight of the newest sample in Pacing's moving means.
PACING_WEIGHT = 0.25
log = logging.getLogger("plughost.sandbox")


class Pacing:
    """Whether a warm child is worth preparing for a key now: not while its
    calls arrive faster than one is prepared. Moving means per key of the
    time between arrivals (`arrived`) and of a child's preparation, its fork
    to ready (`prepared`); before either is known, children are prepared.
    Not thread-safe: WarmPool calls it under its lock. `clock` is
    time.monotonic but for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[tuple[Any, ...], float] = {}  # the key's last arrival
        self._interval: dict[tuple[Any, ...], float] = {}
        self._prepare: dict[tuple[Any, ...], float] = {}
        self.skipped = 0  # fills not started, for measurements

    def arrived(self, key: tuple[Any, ...]) -> None:
        """A call of `key` arrived now."""
        now = self._clock()
        last = self._last.get(key)
        self._last[key] = now
        if last is not None:
            self._interval[key] = _mean(self._interval.get(key), now - last)

    def prepared(self, key: tuple[Any, ...], seconds: float) -> None:
        """A child of `key` took `seconds` from its fork until it was ready."""
        self._prepare[key] = _mean(self._prepare.get(key), seconds)

    def wanted(self, key: tuple[Any, ...]) -> bool:
        """False while calls of `key` come faster than a child is prepared."""
        interval, prepare = self._interval.get(key), self._prepare.get(key)
        if interval is None or prepare is None or interval >= prepare:
            return True
        self.skipped += 1
        return False


def _mean(mean: float | None, sample: float) -> float:
    """The moving mean `mean` with `sample` added (the sample itself when there was none)."""
    return sample if mean is None else mean + PACING_WEIGHT * (sample - mean)


class WarmPool:
    """Warm handles by key; thread-safe. `put_away` closes one for good."""

    def __init__(
        self,
        size: int,
        put_away: Callable[[ChildHandle], None],
        pacing: Pacing | None = None,
    ) -> None:
        self.size = size
        self.pacing = pacing or Pacing()
        self.hits = 0
        self.idle_s = WARM_IDLE_S
        self._put_away = put_away
        self._waiting: dict[tuple[Any, ...], list[ChildHandle]] = {}
        # Put away by the keeper, until the closer has given their resources back.
        self._leaving: list[ChildHandle] = []
        self._starting: dict[tuple[Any, ...], int] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plughost-prewarm")
        self._keeper: threading.Thread | None = None
        self._wake = (-1, -1)  # the keeper's wake-up pipe, while it runs

    def take(self, key: tuple[Any, ...]) -> ChildHandle | None:
        """A live, stopped handle for `key`; None if there is none. Counts
        a call of `key` arriving (`Pacing`)."""
        with self._lock:
            self.pacing.arrived(key)
            for handle in self._waiting.get(key, []):
                if handle.stopped and handle.alive():
                    self._waiting[key].remove(handle)
                    self.hits += 1
                    return handle
        return None

    def fill(
        self,
        key: tuple[Any, ...],
        start: Callable[[], ChildHandle],
        after: threading.Event | None = None,
    ) -> None:
        """Start, in the background, the handles `key` lacks, unless its
        calls come faster than a child is prepared (`Pacing`): once `after`
        is set (the call that asked has its verdict), or FILL_DELAY_S later."""
        with self._lock:
            missing = self.size - len(self._waiting.get(key, [])) - self._starting.get(key, 0)
            if missing <= 0 or self._closed or not self.pacing.wanted(key):
                return
            self._starting[key] = self._starting.get(key, 0) + missing

        def start_children() -> None:
            if after is not None:
                after.wait(FILL_DELAY_S)
            for _ in range(missing):
                handle: ChildHandle | None
                try:
                    handle = start()
                except Exception:  # noqa: BLE001 - a failed warm-up only means a cold start later
                    log.warning("could not prewarm a child", exc_info=True)
                    handle = None
                with self._lock:
                    self._starting[key] -= 1
                    if handle is not None and not self._closed:
                        self._waiting.setdefault(key, []).append(handle)
                        self._keep_locked()
                        handle = None
                if handle is not None:
                    self._put_away(handle)

        self._starter.submit(start_children)

    # -- the keeper ------------------------------------------------------------

    def _keep_locked(self) -> None:
        """Start the keeper if it is not running, else wake it (a new handle)."""
        if self._keeper is None:
            self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            # A daemon: a host that exits without closing its sandbox is not held
            # up for a child's idle limit (the launcher kills its children then).
            self._keeper = threading.Thread(
                target=self._keep, name="plughost-warm-keeper", daemon=True
            )
            self._keeper.start()
        else:
            with contextlib.suppress(BlockingIOError):  # full: it will wake anyway
                os.write(self._wake[1], b"x")

    def _keep(self) -> None:
        """The keeper's loop: stop each child once it has imported its plugin,
        put away those whose time is up or that died. Ends when the pool is
        closed or keeps nothing."""
        while True:
            with self._lock:
                handles = [h for hs in self._waiting.values() for h in hs]
                if self._closed or not handles:
                    os.close(self._wake[0])
                    os.close(self._wake[1])
                    self._wake, self._keeper = (-1, -1), None
                    return
                wake = self._wake[0]
                fds = [fd for handle in handles for fd in handle.watched_fds()]
                until = min(self._time_up(handle) for handle in handles)
            poller = select.poll()  # descriptors past select()'s 1024
            for fd in (wake, *fds):
                poller.register(fd, select.POLLIN)
            wait_ms = max(0.0, until - time.monotonic()) * 1000
            if any(fd == wake for fd, _ in poller.poll(wait_ms)):
                while True:
                    try:
                        if not os.read(wake, 64):
                            break
                    except BlockingIOError:
                        break
            self._tend()

    def _time_up(self, handle: ChildHandle) -> float:
        """When `handle` is put away unless taken: its idle limit; while it
        imports its plugin, its plugin's timeout after the import began (it
        could never serve a call in time, and plugin code runs before a call
        no longer than during one); while its stop is asked for, STOP_WAIT_S
        after that; before it is set up, PID_GRACE_S more."""
        idle = handle.created + self.idle_s
        if handle.stopped:
            return idle
        if handle.stopping:
            return min(idle, handle.stop_began + STOP_WAIT_S)
        if handle.import_began:
            return min(idle, handle.import_began + handle.timeout_s)
        return min(idle, handle.created + handle.timeout_s + PID_GRACE_S)

    def _tend(self) -> None:
        """One round of the keeper: ask for the stop of the handles that
        said "w" and take the stoppers' answers; put away those whose time
        is up, that died, that could not be stopped, or whose socket said
        anything else. Never waits: every stop runs at once, each in its
        own stopper, so no plugin delays another's."""
        now = time.monotonic()
        away: list[ChildHandle] = []
        with self._lock:
            for key, handles in self._waiting.items():
                for handle in list(handles):
                    was_stopped = handle.stopped
                    if not self._fine(handle, now):
                        handles.remove(handle)
                        away.append(handle)
                    elif handle.stopped and not was_stopped:
                        self.pacing.prepared(key, now - handle.created)
            self._leaving = [h for h in self._leaving if not h.closed] + away
        for handle in away:
            self._put_away(handle)

    def _fine(self, handle: ChildHandle, now: float) -> bool:
        """Move `handle` on if it can; False when it must be put away."""
        if now >= self._time_up(handle) or not handle.alive():
            return False
        if handle.stopped:
            return True
        if handle.stopping:
            return handle.stop_answer() is not False
        handle.note_import(now)
        if not handle.heard():
            return True  # still being set up, or importing
        # "w": set up and imported; anything else: its socket ended, or the plugin wrote on it.
        return handle.set_up() and handle.begin_stop()

    # -- for tests and measurements -------------------------------------------

    def settle(self, timeout_s: float = 5.0) -> None:
        """Wait until no handle is being started (each one's descriptors are
        counted from then on, whether it still imports, is being stopped or
        is stopped)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not any(self._starting.values()):
                    return
            time.sleep(0.005)

    def _all_locked(self) -> list[ChildHandle]:
        return [h for hs in self._waiting.values() for h in hs]

    def held_fds(self) -> int:
        """Descriptors of the host's the waiting handles, those the keeper put
        away (until they are closed) and the keeper itself hold."""
        with self._lock:
            keeper = 2 if self._keeper is not None else 0  # its wake-up pipe
            handles = self._all_locked() + self._leaving
            return keeper + sum(handle.held_fds() for handle in handles if not handle.closed)

    def count(self) -> int:
        """Children stopped and waiting for a call now."""
        with self._lock:
            return sum(handle.stopped for handles in self._waiting.values() for handle in handles)

    def pids(self) -> set[int]:
        """Pids of the waiting children (the root of each one's processes)."""
        with self._lock:
            return {handle.pid for handle in self._all_locked()} - {0}

    def uids(self) -> set[int]:
        with self._lock:
            return {handle.uid for handle in self._all_locked() if handle.uid is not None}

    def close(self) -> None:
        """Stop the keeper and the starter, and put every waiting handle away."""
        with self._lock:
            self._closed = True
            keeper = self._keeper
            if keeper is not None:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake[1], b"x")
        if keeper is not None:
            keeper.join()
        self._starter.shutdown(wait=True)
        with self._lock:
            handles = self._all_locked()
            self._waiting.clear()
        for handle in handles:
            self._put_away(handle)
