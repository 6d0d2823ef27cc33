"""The sandbox: manages the children calls run in (runs in the host).

Data flow of `Sandbox.execute` (one host thread per call)::

    Sandbox.execute(call, token)
      layers detected once; strict refuses while one is missing
      handle = warm pool's child for this plugin, or a new one:
        uid (UidPool), cgroup (CallCgroup), scratch  -> ChildHandle
        ChildHandle.start: pipes, sealed payload memfd, ChildSpec
                           -> Launcher.start_child -> fork -> sandbox.child
      (prewarm: a warm child for the next call is asked for now, started in
       the background once this call has its verdict, or a few ms into it)
      sandbox.call.run_call(handle, call, token)    one call: watch, verdict
      finally: Closer.close(handle): in the closer's thread, wait for the reap,
               kill what is left, cgroup, scratch, fds, uid

"Run one call" lives in `sandbox.call` (with its pure verdict); this
module only manages children: their uids,
cgroups, the warm pool and which layers they get. Nothing read from a child
is unpickled.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sandbox import cgroup2, trace
from sandbox.call import CancelToken, run_call
from sandbox.cgroups import HOSTS_DIR, CgroupPool, sweep_stale
from sandbox.handle import ChildHandle
from sandbox.launcher_client import Launcher, LauncherError
from sandbox.layers import (
    CGROUP_LAYERS,
    CGROUP_V1,
    OPTIONAL_LAYERS,
    detect,
    missing,
    protections,
    resolve,
    shortfall,
)
from sandbox.outcome import HostFailure, Outcome, Status
from sandbox.prewarm import WarmPool
from sandbox.protocol import CallSpec

# Per-call uids are base .. base + UID_SLOTS - 1 (`Sandbox.uid_range`): no
# user of the machine may own one. The base is a setting of the Sandbox; its
# default comes from PLUGHOST_UID_BASE, read when a Sandbox is made (the test
# suite uses a range of its own, so it never mistakes a running server's calls
# for its own leaks).
DEFAULT_UID_BASE = 1500000
UID_SLOTS = 1024
LOCK_DIR = "/run/plughost/uids"


def uid_range(base: int | None = None) -> range:
    """The per-call uids of a host whose range starts at `base` (None:
    PLUGHOST_UID_BASE, or DEFAULT_UID_BASE). Raises ValueError for a base
    that is not a positive integer."""
    if base is None:
        text = os.environ.get("PLUGHOST_UID_BASE", str(DEFAULT_UID_BASE))
        try:
            base = int(text)
        except ValueError:
            raise ValueError(f"PLUGHOST_UID_BASE must be an integer, not {text[:40]!r}") from None
    if base <= 0:
        raise ValueError(f"the per-call uid base must be positive, not {base}")
    return range(base, base + UID_SLOTS)


ISOLATION_LEVELS = ("standard", "strict")
# Calls in a row that fail at set-up before the host stops calling itself
# ready (`Sandbox.setup_problem`): one can be a passing fault, three are not.
SETUP_FAILURES_NOT_READY = 3
# ... and for how long after the last failure (then it is tried again).
SETUP_PROBLEM_S = 30.0
log = logging.getLogger("plughost.sandbox")


def _warm_key(call: CallSpec) -> tuple[Any, ...]:
    return (call.plugin_dir, call.entrypoint, call.limits, call.import_paths, call.import_root)


class Sandbox:
    """Executes calls, one fresh child process each; safe to share between threads.

    isolation: "standard" applies every layer this machine offers and logs a
        warning once for each one it lacks; "strict" refuses to run plugins
        (InternalError) while any layer is missing.
    disabled: layers switched off on purpose (names from OPTIONAL_LAYERS).
    prewarm: children kept set up and waiting, per plugin recently called, so
        a call pays a hand-over instead of a start (each is still used once).
    uid_base: first of the UID_SLOTS per-call uids of a root host (None:
        PLUGHOST_UID_BASE, read now, or DEFAULT_UID_BASE).
    """

    def __init__(
        self,
        launcher: Launcher | None = None,
        scratch_root: str | None = None,
        isolation: str = "standard",
        disabled: Iterable[str] = (),
        prewarm: int = 0,
        uid_base: int | None = None,
    ) -> None:
        if isolation not in ISOLATION_LEVELS:
            raise ValueError(f"isolation must be one of {ISOLATION_LEVELS}, not {isolation!r}")
        unknown = set(disabled) - set(OPTIONAL_LAYERS)
        if unknown:
            raise ValueError(f"unknown isolation layers: {', '.join(sorted(unknown))}")
        self.launcher = launcher or Launcher()
        self.uid_range = uid_range(uid_base)
        self.isolation = isolation
        self._disabled = frozenset(disabled)
        self._active: dict[str, bool] | None = None
        self._lacking: list[str] = []  # of the active layers, once they are known
        self._layers_lock = threading.Lock()
        self._uids: UidPool | None = None
        self._cgroup2: Path | None = None  # where call cgroups go on cgroup v2
        self._cgroups: CgroupPool | None = None  # once the layers are known
        self._swept: set[int] = set()  # uids checked for leftovers of an earlier host
        self._scratch_root = scratch_root
        self.prewarm = prewarm
        self._closer = Closer()
        self._setup_failures = 0  # calls in a row that could not be set up
        self._setup_failed_at = 0.0  # monotonic time of the last of them
        # Warm children gone stale are put away off the path of the call that found them.
        self.warm_pool = WarmPool(prewarm, put_away=self._closer.close)

    def active_layers(self) -> dict[str, bool]:
        """Optional layers calls get here: detected once, minus the disabled ones."""
        with self._layers_lock:
            if self._active is None:
                found = detect()
                if not any(found.get(name) for name in CGROUP_LAYERS):
                    # No v1 controllers: per-call cgroups in the unified hierarchy.
                    self._cgroup2 = cgroup2.usable()
                    if self._cgroup2 is not None:
                        log.info("per-call cgroups: cgroup v2 below %s", self._cgroup2)
                active = resolve(found, self._disabled, cgroup_v2=self._cgroup2 is not None)
                self._lacking = missing(active)
                if self.isolation == "standard":
                    notes, warnings = shortfall(active, self._disabled)
                    for line in notes:
                        log.info("%s", line)
                    for line in warnings:
                        log.warning("%s", line)
                if active["privilege_drop"]:
                    self._uids = UidPool(self.uid_range)
                self._cgroups = CgroupPool(active, self._cgroup2)
                stale = sweep_stale(active, self._cgroup2)
                if stale:
                    log.info("removed %d cgroups left by hosts that were killed", stale)
                self._active = active
            return dict(self._active)

    def protections(self) -> dict[str, bool]:
        """Which isolation layers calls actually get on this host (a root
        host's user namespace, which it does not need, is left out)."""
        return protections(self.active_layers())

    def execute(self, call: CallSpec, token: CancelToken | None = None) -> Outcome:
        """Run `call` in a fresh child and return its outcome; cancelling
        `token` stops the call.

        Returns as soon as the verdict is final: the plugin's process has
        exited or been killed. The rest of the call's processes end right
        after; reaping them and giving back the uid, cgroup and scratch
        happen off the caller's path (`Closer`), also when the calling
        thread is interrupted. Raises HostFailure for host-side
        failures (no uid free, the launcher unreachable or gone, limits that
        cannot be applied, a layer missing in strict mode), which the
        ToolRunner reports.
        """
        if token is not None and token.cancelled:
            return Outcome(Status.SANDBOX_STOPPED, reason="cancelled", message="call was cancelled")
        layers = self.active_layers()
        lacking = self._lacking
        if self.isolation == "strict" and lacking:
            raise HostFailure(
                "isolation level strict: missing layers " + ", ".join(lacking),
                {"missing_layers": lacking},
            )
        handle, judged = None, None
        if self.prewarm:
            key = _warm_key(call)
            handle = self.warm_pool.take(key)
            # The next call's child, set up beside this call once it has its
            # verdict or has run a while (prewarm.FILL_DELAY_S).
            waiting, judged = call.without_payload(), threading.Event()
            self.warm_pool.fill(key, lambda: self._start(waiting, layers, warm=True), judged)
        trace.mark("host.execute_checks")
        if handle is None:
            try:
                handle = self._start(call, layers, warm=False)
            except (OSError, RuntimeError, LauncherError) as exc:
                self._set_up(f"{type(exc).__name__}: {exc}")
                raise
        try:
            outcome = run_call(handle, call, token)
        except HostFailure as exc:
            if exc.details.get("stage") == "sandbox_setup":
                self._set_up(exc.details.get("stderr_tail") or exc.message)
            raise
        finally:
            if judged is not None:
                judged.set()
            self._closer.close(handle)
            trace.mark("host.uid_release")
        self._set_up(None)
        return outcome

    def _set_up(self, problem: str | None) -> None:
        """Count calls that could not be set up in a row; the problem goes to
        the operator's log (it may name host paths), not to `setup_problem`."""
        if problem is None:
            self._setup_failures = 0
            return
        self._setup_failures += 1
        self._setup_failed_at = time.monotonic()
        log.warning("a call could not be set up (%d in a row): %s", self._setup_failures, problem)

    def setup_problem(self) -> str | None:
        """Why calls cannot be set up, while the last SETUP_FAILURES_NOT_READY
        calls failed at set-up (their limits or layers could not be applied,
        the launcher could not start them) and the last of them is less than
        SETUP_PROBLEM_S old; None otherwise. It expires so that a host taken
        out of service for it is tried again: a passing fault must not keep
        it out for good. Names no host path (the log has the details)."""
        if self._setup_failures < SETUP_FAILURES_NOT_READY:
            return None
        if time.monotonic() - self._setup_failed_at > SETUP_PROBLEM_S:
            return None
        return f"{self._setup_failures} calls in a row failed at set-up (the host's log says why)"

    def _start(self, call: CallSpec, layers: dict[str, bool], warm: bool) -> ChildHandle:
        """A handle on a new child for `call`: cold (payload handed over now)
        or warm (set up and waiting for its payload on a socket). Returns once
        the launcher reported its pid."""
        assert self._cgroups is not None  # made with the layers
        uid, lock_fd = self._uids.acquire() if self._uids is not None else (None, -1)
        trace.mark("host.uid_acquire")
        sweep = uid is not None and uid not in self._swept  # leftovers of a host that died
        if uid is not None:
            self._swept.add(uid)
        return ChildHandle.spawn(
            self.launcher,
            call,
            layers,
            uid=uid,
            lock_fd=lock_fd,
            cgroups=self._cgroups,
            # A root host, or one with user namespaces, gives the child a tmpfs
            # scratch in its own minimal root.
            scratch=None
            if uid is not None or layers["user_namespace"]
            else tempfile.mkdtemp(prefix="plughost-call-", dir=self._scratch_root),
            warm=warm,
            sweep=sweep,
        )

    # -- prewarmed children (sandbox/prewarm.py) -----------------------------

    @property
    def warm_hits(self) -> int:
        """Calls that got a prewarmed child."""
        return self.warm_pool.hits

    def warm_count(self) -> int:
        """Children set up and waiting in the pool now."""
        return self.warm_pool.count()

    def warm_uids(self) -> set[int]:
        """Uids of the children waiting in the pool (not leftovers of a call)."""
        return self.warm_pool.uids()

    def host_paths(self) -> list[Path]:
        """Directories the host writes in for every call: the call cgroups'
        parents and the uid and host lock directories (a server that gives
        up root hands them to its user)."""
        layers = self.active_layers()
        paths = [Path(LOCK_DIR), Path(HOSTS_DIR)]
        if self._cgroup2 is not None:
            return [*paths, self._cgroup2]
        return paths + [
            Path(CGROUP_V1[name]) / "plughost" for name in CGROUP_LAYERS if layers.get(name)
        ]

    def uids_at_rest(self) -> set[int]:
        """Per-call uids this host has used that no call holds now (empty on
        a host without them): processes under one were left by its calls."""
        self.active_layers()
        return self._uids.at_rest() if self._uids is not None else set()

    def warm_fds(self) -> int:
        """Descriptors of the host's held by the children waiting in the pool."""
        return self.warm_pool.held_fds()

    def warm_pids(self) -> set[int]:
        """Pids of the children waiting in the pool (not leftovers of a call)."""
        return self.warm_pool.pids()

    def settle(self, timeout_s: float = 5.0) -> None:
        """Wait until every call that returned is put away and no warm child
        is being started (for measurements and tests)."""
        self._closer.wait_idle(timeout_s)
        self.warm_pool.settle(timeout_s)
        self._closer.wait_idle(timeout_s)  # what the warm pool's keeper put away

    def kept_cgroups(self) -> list[Path]:
        """Directories of the call cgroups kept for the uids' next calls."""
        pool = self._cgroups
        return [path for c in pool.kept() for path in c.dirs.values()] if pool else []

    def close(self) -> None:
        """Kill the warm children, put away what calls left (removing the
        cgroups kept for the uids' next calls), stop the launcher."""
        self.warm_pool.close()
        self._closer.wait_idle(10.0)
        if self._cgroups is not None:
            self._cgroups.close()
        self.launcher.stop()


class Closer:
    """Puts away the handles of finished calls off their latency path.

    A call's outcome goes back as soon as the verdict is final: the
    plugin's process has exited (or been killed) and every byte it wrote is
    read. What follows, the clean-up of its uid's slot (or its init's exit
    and the namespaces' teardown), the reap, the cgroups given back (kept
    for the uid's next call, or removed), runs here, in one thread; the
    call's uid, and so its slot, is free for another call only once
    `ChildHandle.close` is done.
    """

    def __init__(self) -> None:
        self._pending: list[ChildHandle] = []
        self._busy = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def close(self, handle: ChildHandle) -> None:
        """Close `handle` soon, in the closer's thread."""
        with self._cond:
            self._pending.append(handle)
            self._busy += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="plughost-closer", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every handle given so far is closed; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._busy == 0, timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: bool(self._pending), 30.0):
                    self._thread = None  # idle: a later close starts another
                    return
                handle = self._pending.pop(0)
            trace.mark("host.close")
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - one handle's failure must not stop the others
                log.exception("putting away a finished call failed")
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()


class UidPool:
    """Hands out one unprivileged uid per running call.

    A uid is held with an exclusive `flock` on a file in LOCK_DIR, so two
    hosts on one machine never share one; the lock dies with its holder.
    """

    def __init__(self, uids: range) -> None:
        self._uids = uids
        self.used: set[int] = set()  # every uid this pool has handed out
        os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)

    def acquire(self) -> tuple[int, int]:
        """Lock a free uid. Returns `(uid, lock_fd)`; closing `lock_fd` gives
        the uid back (`ChildHandle.close`). Raises HostFailure when all are taken."""
        for uid in self._uids:
            fd = os.open(f"{LOCK_DIR}/{uid}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.used.add(uid)
            return uid, fd
        raise HostFailure(f"all {len(self._uids)} sandbox uids are in use")

    def at_rest(self) -> set[int]:
        """Uids this pool has handed out that no call holds now, of this host
        or another: a process running under one is a leftover of this host's."""
        free = set()
        for uid in sorted(self.used):
            fd = os.open(f"{LOCK_DIR}/{uid}", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                free.add(uid)
            except BlockingIOError:
                continue
            finally:
                os.close(fd)
        return free


__all__ = ["OPTIONAL_LAYERS", "CallSpec", "Sandbox"]
