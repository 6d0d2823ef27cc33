"""Resource limits of one plugin call, as values (host; `rlimits_for` also in the child).

`HostLimits` is the one documented place for the host's tunables: the
defaults a plugin gets when its manifest is silent and the maxima its
manifest cannot exceed. `PluginLimits` is what a manifest asks for.
`HostLimits.clamp` turns the two into the `CallLimits` of one call, and
`rlimits_for` turns those into the kernel rlimits the child applies to
itself before it imports any plugin code.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class PluginLimits:
    """Limits a plugin manifest asks for; `None` means the host default."""

    timeout_s: float | None = None
    memory_mb: int | None = None


@dataclass(frozen=True)
class CallLimits:
    """The limits one sandboxed call runs under, already clamped."""

    timeout_s: float
    memory_mb: int
    max_processes: int
    max_open_files: int
    max_file_size_mb: int
    max_output_bytes: int
    max_stream_bytes: int
    scratch_mb: int
    cpus: int = 2


@dataclass(frozen=True)
class HostLimits:
    """Host-wide defaults and maxima for plugin calls.

    timeout_s / memory_mb: used when a manifest does not set them.
    max_timeout_s / max_memory_mb: a manifest value above them is clamped.
    max_processes: processes the call's whole tree may hold at once,
        the call's own process included (RLIMIT_NPROC on a per-call uid).
    max_open_files: descriptors per process (RLIMIT_NOFILE).
    max_file_size_mb: largest file a plugin may write (RLIMIT_FSIZE).
    max_output_bytes: largest JSON result a plugin may return.
    max_stream_bytes: stdout plus stderr a plugin may print before it is
        stopped; only a short tail of it is kept.
    max_image_bytes: largest image a payload may carry.
    scratch_mb: size of the call's scratch directory (a tmpfs when the host
        runs as root, so a plugin cannot fill the host's disk).
    cpus: CPUs a call runs on and sizes its thread pools for (its affinity
        mask, `os.cpu_count()` and the BLAS and OpenMP thread variables), at
        most the host's own: a plugin behaves the same on 2 cores and on 64.
    """

    timeout_s: float = 10.0
    memory_mb: int = 256
    max_timeout_s: float = 60.0
    max_memory_mb: int = 2048
    max_processes: int = 16
    max_open_files: int = 64
    max_file_size_mb: int = 16
    max_output_bytes: int = 1 * MiB
    max_stream_bytes: int = 4 * MiB
    max_image_bytes: int = 20 * MiB
    scratch_mb: int = 64
    cpus: int = 2

    def clamp(self, wanted: PluginLimits) -> CallLimits:
        """Return the limits of a call for a plugin asking for `wanted`."""
        timeout = self.timeout_s if wanted.timeout_s is None else wanted.timeout_s
        memory = self.memory_mb if wanted.memory_mb is None else wanted.memory_mb
        return CallLimits(
            timeout_s=min(max(timeout, 0.01), self.max_timeout_s),
            memory_mb=min(max(memory, 16), self.max_memory_mb),
            max_processes=self.max_processes,
            max_open_files=self.max_open_files,
            max_file_size_mb=self.max_file_size_mb,
            max_output_bytes=self.max_output_bytes,
            max_stream_bytes=self.max_stream_bytes,
            scratch_mb=self.scratch_mb,
            cpus=max(self.cpus, 1),
        )


# Room in the address space beyond the memory limit, for what a process
# reserves and never touches: thread stacks (`thread_stack_bytes` each, one
# per process the call may hold: RLIMIT_NPROC counts threads), malloc's
# per-thread arenas and mapped libraries. Where a memory cgroup counts the
# call's pages, what stops a call is the memory it uses, so the room is
# large; without one the address space is the per-process bound, so it is
# kept small. Either way a single reservation of gigabytes is refused
# (`huge_allocation`, `untouched_reservation`).
COUNTED_HEADROOM = 1024 * MiB
UNCOUNTED_HEADROOM = 256 * MiB
# glibc sizes a thread's default stack by RLIMIT_STACK as the process starts
# (the launcher, whose forks the calls are); where that is unlimited it takes
# a fixed size of a few MiB, which 8 MiB covers.
MAX_THREAD_STACK = 64 * MiB


def thread_stack_bytes() -> int:
    """The default stack of a new thread in a process forked from this one."""
    soft, _ = resource.getrlimit(resource.RLIMIT_STACK)
    return 8 * MiB if soft == resource.RLIM_INFINITY else min(soft, MAX_THREAD_STACK)


def address_space_bytes(limits: CallLimits, counted: bool, extra_processes: int = 0) -> int:
    """RLIMIT_AS (and RLIMIT_DATA) of a call's processes: its memory limit,
    room for a stack per thread it may start, and headroom (`counted`: a
    memory cgroup counts the call's pages)."""
    stacks = (limits.max_processes + extra_processes) * thread_stack_bytes()
    headroom = COUNTED_HEADROOM if counted else UNCOUNTED_HEADROOM
    return limits.memory_mb * MiB + stacks + headroom


def rlimits_for(
    limits: CallLimits, extra_processes: int = 0, counted: bool = True
) -> dict[int, tuple[int, int]]:
    """Map call limits to `{RLIMIT_*: (soft, hard)}`, soft == hard.

    Soft and hard are equal so the plugin cannot raise a soft limit back up.
    `extra_processes` makes room for sandbox processes of the same uid that
    are not the plugin's (the init of a PID namespace); `counted` says a
    memory cgroup counts the call's pages (`address_space_bytes`).
    """
    processes = limits.max_processes + extra_processes
    space = address_space_bytes(limits, counted, extra_processes)
    # The host enforces the wall clock; CPU seconds are the backstop for a
    # host that stopped watching. One second of slack keeps the host's own
    # verdict (timeout) first for a busy loop.
    cpu = math.ceil(limits.timeout_s) + 1
    return {
        # Address space, not RSS: the only per-process memory rlimit Linux
        # enforces. The memory limit itself is the cgroup's and the host's
        # watchdog's (over the whole tree); this refuses huge reservations.
        resource.RLIMIT_AS: (space, space),
        # A data-segment cap as well, for allocators that use brk (it counts
        # private writable mappings, thread stacks among them).
        resource.RLIMIT_DATA: (space, space),
        resource.RLIMIT_CPU: (cpu, cpu),
        resource.RLIMIT_NOFILE: (limits.max_open_files, limits.max_open_files),
        resource.RLIMIT_FSIZE: (limits.max_file_size_mb * MiB, limits.max_file_size_mb * MiB),
        # Counts every process of the call's own uid, so it caps the tree.
        # Root ignores it, which is why the child drops to that uid first.
        resource.RLIMIT_NPROC: (processes, processes),
        # No core dumps: a crashing plugin must not write its memory to disk.
        resource.RLIMIT_CORE: (0, 0),
        # Nothing locked in RAM beyond what the kernel gives by default.
        resource.RLIMIT_MEMLOCK: (0, 0),
        # POSIX message queues are refused where memory is not counted
        # (seccomp); where they open, they hold no more than this.
        resource.RLIMIT_MSGQUEUE: (64 * 1024, 64 * 1024),
    }
