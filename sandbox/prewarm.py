"""Prewarmed children: forked and set up before a call, waiting for its payload.

A `Slot` is one forked child with everything the host holds for it (uid,
cgroup, pipes, the socket its payload arrives on). `WarmPool` keeps up to
`size` set-up slots per key (a plugin with its limits), hands one to a call
(`take`) and starts replacements in one background thread (`fill`). A warm
child still serves exactly one call; one that sat unused for WARM_IDLE_S, or
that died while waiting, is put away.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sandbox.cgroups import CallCgroup
from sandbox.processes import CallProcesses

WARM_IDLE_S = 30.0
log = logging.getLogger("plughost.sandbox")


@dataclass
class Slot:
    """One forked child with everything the host holds for it."""

    uid: int | None
    lock_fd: int
    cgroup: CallCgroup
    scratch: str | None
    pid_namespace: bool
    opened: list[int] = field(default_factory=list)
    read_ends: dict[str, int] = field(default_factory=dict)
    procs: CallProcesses | None = None
    go: socket.socket | None = None  # a warm child's payload socket
    created: float = field(default_factory=time.monotonic)
    waiting: bool = False

    def set_up(self) -> bool:
        """True once the warm child said it is set up and waiting for its payload."""
        if not self.waiting and self.go is not None and _readable(self.go.fileno()):
            self.waiting = self.go.recv(1) == b"w"
        return self.waiting

    def alive(self) -> bool:
        """False once the child has exited (its status pipe has something to say)."""
        fd = self.read_ends.get("status")
        if fd is None:
            return False
        return not _readable(fd)


def _readable(fd: int) -> bool:
    """Whether `fd` has something to read now (poll: any descriptor number,
    where select stops at 1024)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class WarmPool:
    """Warm slots by key; thread-safe. `release` puts a slot away for good."""

    def __init__(self, size: int, release: Callable[[Slot], None]) -> None:
        self.size = size
        self.hits = 0
        self._release = release
        self._slots: dict[tuple[Any, ...], list[Slot]] = {}
        self._starting: dict[tuple[Any, ...], int] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plughost-prewarm")

    def take(self, key: tuple[Any, ...]) -> Slot | None:
        """A live slot for `key`, set up if one is; None if there is none."""
        stale: list[Slot] = []
        found = None
        with self._lock:
            now = time.monotonic()
            for slots in self._slots.values():
                for slot in list(slots):
                    if now - slot.created > WARM_IDLE_S or not slot.alive():
                        slots.remove(slot)
                        stale.append(slot)
            slots = self._slots.get(key, [])
            if slots:
                # One that is set up already if there is one; any other is
                # still ahead of a cold start.
                ready = [slot for slot in slots if slot.set_up()]
                found = ready[0] if ready else slots[0]
                slots.remove(found)
                self.hits += 1
        for slot in stale:
            self._release(slot)
        return found

    def fill(self, key: tuple[Any, ...], start: Callable[[], Slot]) -> None:
        """Start, in the background, the slots `key` lacks."""
        with self._lock:
            missing = self.size - len(self._slots.get(key, [])) - self._starting.get(key, 0)
            if missing <= 0 or self._closed:
                return
            self._starting[key] = self._starting.get(key, 0) + missing

        def start_slots() -> None:
            for _ in range(missing):
                slot: Slot | None
                try:
                    slot = start()
                except Exception:  # noqa: BLE001 - a failed warm-up only means a cold start later
                    log.warning("could not prewarm a child", exc_info=True)
                    slot = None
                with self._lock:
                    self._starting[key] -= 1
                    if slot is not None and not self._closed:
                        self._slots.setdefault(key, []).append(slot)
                        slot = None
                if slot is not None:
                    self._release(slot)

        self._starter.submit(start_slots)

    def settle(self, timeout_s: float = 5.0) -> None:
        """Wait until no slot is being started."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not any(self._starting.values()):
                    return
            time.sleep(0.005)

    def count(self) -> int:
        """Slots set up and waiting now."""
        with self._lock:
            return sum(slot.set_up() for slots in self._slots.values() for slot in slots)

    def pids(self) -> set[int]:
        """Pids of the waiting children (the root of each one's processes)."""
        with self._lock:
            return {s.procs.root_pid for slots in self._slots.values() for s in slots if s.procs}

    def uids(self) -> set[int]:
        with self._lock:
            return {s.uid for slots in self._slots.values() for s in slots if s.uid is not None}

    def close(self) -> None:
        """Stop starting slots and put every waiting one away."""
        with self._lock:
            self._closed = True
            slots = [slot for slots in self._slots.values() for slot in slots]
            self._slots.clear()
        self._starter.shutdown(wait=True)
        for slot in slots:
            self._release(slot)
