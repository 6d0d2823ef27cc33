"""Prewarmed children: forked and set up before a call, waiting for its payload (host).

`WarmPool` keeps up to `size` handles (`sandbox.handle.ChildHandle`) per key
(a plugin with its limits) whose children are set up and waiting, hands one
to a call (`take`) and starts replacements in one background thread
(`fill`). A warm child imports its plugin while it waits (`sandbox.child`)
and still serves exactly one call; one that sat unused for WARM_IDLE_S,
that died while waiting, or that is still importing after its plugin's
timeout, is put away.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sandbox.handle import ChildHandle

WARM_IDLE_S = 30.0
log = logging.getLogger("plughost.sandbox")


def _stale(handle: ChildHandle, now: float) -> bool:
    """Unused for too long, gone, or still importing its plugin after as long
    as a call to it may take (it could never serve one in time)."""
    age = now - handle.created
    if age > WARM_IDLE_S or not handle.alive():
        return True
    return age > handle.timeout_s and not handle.set_up()


class WarmPool:
    """Warm handles by key; thread-safe. `put_away` closes one for good."""

    def __init__(self, size: int, put_away: Callable[[ChildHandle], None]) -> None:
        self.size = size
        self.hits = 0
        self._put_away = put_away
        self._waiting: dict[tuple[Any, ...], list[ChildHandle]] = {}
        self._starting: dict[tuple[Any, ...], int] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plughost-prewarm")

    def take(self, key: tuple[Any, ...]) -> ChildHandle | None:
        """A live handle for `key`, set up if one is; None if there is none."""
        stale: list[ChildHandle] = []
        found = None
        with self._lock:
            now = time.monotonic()
            for handles in self._waiting.values():
                for handle in list(handles):
                    if _stale(handle, now):
                        handles.remove(handle)
                        stale.append(handle)
            # Only a child that is set up and has imported its plugin: one
            # still importing would spend the call's deadline on what ran
            # before the call (a cold start counts its import against it).
            ready = [handle for handle in self._waiting.get(key, []) if handle.set_up()]
            if ready:
                found = ready[0]
                self._waiting[key].remove(found)
                self.hits += 1
        for handle in stale:
            self._put_away(handle)
        return found

    def fill(self, key: tuple[Any, ...], start: Callable[[], ChildHandle]) -> None:
        """Start, in the background, the handles `key` lacks."""
        with self._lock:
            missing = self.size - len(self._waiting.get(key, [])) - self._starting.get(key, 0)
            if missing <= 0 or self._closed:
                return
            self._starting[key] = self._starting.get(key, 0) + missing

        def start_children() -> None:
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
                        handle = None
                if handle is not None:
                    self._put_away(handle)

        self._starter.submit(start_children)

    def settle(self, timeout_s: float = 5.0) -> None:
        """Wait until no handle is being started."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not any(self._starting.values()):
                    return
            time.sleep(0.005)

    def count(self) -> int:
        """Children set up and waiting now."""
        with self._lock:
            return sum(handle.set_up() for handles in self._waiting.values() for handle in handles)

    def pids(self) -> set[int]:
        """Pids of the waiting children (the root of each one's processes)."""
        with self._lock:
            return {handle.pid for handles in self._waiting.values() for handle in handles} - {0}

    def held_fds(self) -> int:
        """Descriptors of the host's the waiting handles hold."""
        with self._lock:
            return sum(
                handle.held_fds() for handles in self._waiting.values() for handle in handles
            )

    def uids(self) -> set[int]:
        with self._lock:
            return {
                s.uid for handles in self._waiting.values() for s in handles if s.uid is not None
            }

    def close(self) -> None:
        """Stop starting handles and put every waiting one away."""
        with self._lock:
            self._closed = True
            handles = [handle for handles in self._waiting.values() for handle in handles]
            self._waiting.clear()
        self._starter.shutdown(wait=True)
        for handle in handles:
            self._put_away(handle)
