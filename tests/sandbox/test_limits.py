"""Limits are clamped to the host's maxima and become equal soft/hard rlimits."""

from __future__ import annotations

import resource

from sandbox.limits import HostLimits, MiB, PluginLimits, rlimits_for, thread_stack_bytes


def test_manifest_limits_are_clamped_to_host_maxima() -> None:
    host = HostLimits(max_timeout_s=30, max_memory_mb=512)
    limits = host.clamp(PluginLimits(timeout_s=3600, memory_mb=100_000))
    assert limits.timeout_s == 30 and limits.memory_mb == 512


def test_missing_manifest_limits_take_the_host_defaults() -> None:
    host = HostLimits(timeout_s=7, memory_mb=200)
    limits = host.clamp(PluginLimits())
    assert limits.timeout_s == 7 and limits.memory_mb == 200


def test_rlimits_are_equal_soft_and_hard_and_forbid_core_dumps() -> None:
    limits = HostLimits().clamp(PluginLimits(timeout_s=2.5, memory_mb=128))
    table = rlimits_for(limits)
    assert all(soft == hard for soft, hard in table.values())
    assert table[resource.RLIMIT_AS] == table[resource.RLIMIT_DATA]
    assert table[resource.RLIMIT_CPU][0] == 4
    assert table[resource.RLIMIT_CORE] == (0, 0)
    assert table[resource.RLIMIT_NPROC][0] == limits.max_processes


def test_the_address_space_leaves_room_for_stacks_but_refuses_gigabytes() -> None:
    """The memory limit limits memory: a call may reserve a stack for every
    thread it may start beyond its limit, and more where a cgroup counts its
    pages; a reservation of 2 GB at 128 MB is refused either way."""
    limits = HostLimits().clamp(PluginLimits(memory_mb=128))
    counted = rlimits_for(limits, counted=True)[resource.RLIMIT_AS][0]
    uncounted = rlimits_for(limits, counted=False)[resource.RLIMIT_AS][0]
    stacks = limits.max_processes * thread_stack_bytes()
    assert uncounted >= 128 * MiB + stacks + 128 * MiB
    assert counted > uncounted
    assert counted < 2048 * MiB
