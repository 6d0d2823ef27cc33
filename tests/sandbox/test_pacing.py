"""The warm pool's pacing: no warm child is prepared while a plugin's calls
come faster than one is prepared, and preparing resumes when they slow down.
Deterministic: a fake clock, and a start function that only counts."""

from __future__ import annotations

import threading

import pytest

from sandbox import prewarm
from sandbox.handle import ChildHandle
from sandbox.prewarm import Pacing, WarmPool

KEY = ("plugin", 1)
OTHER = ("other", 1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def arrivals(pacing: Pacing, clock: Clock, every_s: float, count: int) -> None:
    for _ in range(count):
        clock.now += every_s
        pacing.arrived(KEY)


def test_children_are_prepared_until_both_rates_are_known() -> None:
    clock = Clock()
    pacing = Pacing(clock)
    assert pacing.wanted(KEY)
    arrivals(pacing, clock, 0.001, 10)  # fast calls, but no child was prepared yet
    assert pacing.wanted(KEY)
    pacing.prepared(OTHER, 0.005)  # another plugin's child says nothing of this one
    assert pacing.wanted(KEY)
    assert pacing.skipped == 0


def test_no_child_is_prepared_while_calls_come_faster_than_one_is_prepared() -> None:
    clock = Clock()
    pacing = Pacing(clock)
    pacing.prepared(KEY, 0.005)
    arrivals(pacing, clock, 0.002, 20)
    assert not pacing.wanted(KEY)
    assert pacing.wanted(OTHER)
    assert pacing.skipped == 1


def test_slow_calls_keep_children_prepared() -> None:
    clock = Clock()
    pacing = Pacing(clock)
    pacing.prepared(KEY, 0.005)
    arrivals(pacing, clock, 0.050, 20)
    assert pacing.wanted(KEY)


def test_preparing_resumes_once_the_calls_slow_down() -> None:
    clock = Clock()
    pacing = Pacing(clock)
    pacing.prepared(KEY, 0.005)
    arrivals(pacing, clock, 0.002, 20)
    assert not pacing.wanted(KEY)
    arrivals(pacing, clock, 1.0, 1)  # a pause: the load is over
    assert pacing.wanted(KEY)


def test_a_slower_preparation_raises_the_rate_it_is_skipped_at() -> None:
    clock = Clock()
    pacing = Pacing(clock)
    pacing.prepared(KEY, 0.005)
    arrivals(pacing, clock, 0.010, 20)
    assert pacing.wanted(KEY)
    for _ in range(20):
        pacing.prepared(KEY, 0.020)  # the machine got busy: children take longer
    assert not pacing.wanted(KEY)


def test_one_odd_sample_moves_the_means_only_part_of_the_way() -> None:
    clock = Clock()
    pacing = Pacing(clock)
    pacing.prepared(KEY, 0.005)
    arrivals(pacing, clock, 0.002, 20)
    arrivals(pacing, clock, 0.008, 1)  # one call a little late, within the load
    assert not pacing.wanted(KEY)


def test_the_pool_starts_no_child_while_its_calls_come_too_fast() -> None:
    clock = Clock()
    pacing = Pacing(clock)
    started: list[tuple[object, ...]] = []
    lock = threading.Lock()

    def start(key: tuple[object, ...]) -> ChildHandle:
        with lock:
            started.append(key)
        raise RuntimeError("no child in this test")  # the pool logs it and starts no other

    put_away: list[ChildHandle] = []
    pool = WarmPool(1, put_away.append, pacing)
    try:
        pacing.prepared(KEY, 0.005)
        for _ in range(20):
            clock.now += 0.002
            assert pool.take(KEY) is None
            pool.fill(KEY, lambda: start(KEY))
            pool.settle()
        # The first calls start children (the rate is not known yet); the
        # rest, once the calls are known to come every 2 ms, start none.
        assert 1 <= len(started) <= 3
        early = len(started)
        clock.now += 1.0
        assert pool.take(KEY) is None
        pool.fill(KEY, lambda: start(KEY))
        pool.settle()
        assert len(started) == early + 1
        assert put_away == []
    finally:
        pool.close()


@pytest.mark.parametrize("size", [0, 1])
def test_a_pool_with_no_room_or_fast_calls_starts_nothing(size: int) -> None:
    clock = Clock()
    pacing = Pacing(clock)
    started: list[int] = []

    def start() -> ChildHandle:
        started.append(1)
        raise RuntimeError("no child in this test")

    pool = WarmPool(size, lambda handle: None, pacing)
    try:
        pacing.prepared(KEY, 0.005)
        arrivals(pacing, clock, 0.002, 20)
        pool.fill(KEY, start)
        pool.settle()
        assert started == []
        # A pool of size 0 has no room: the pacing is not even asked.
        assert pacing.skipped == size
    finally:
        pool.close()


def test_a_replacement_waits_for_the_calls_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    # Started while a short call runs, a replacement's host share holds the
    # interpreter and its fork the launcher while the call's reply waits.
    monkeypatch.setattr(prewarm, "FILL_DELAY_S", 30.0)
    started = threading.Event()

    def start() -> ChildHandle:
        started.set()
        raise RuntimeError("no child in this test")

    pool = WarmPool(1, lambda handle: None)
    try:
        judged = threading.Event()
        pool.fill(KEY, start, judged)
        assert not started.wait(0.3)
        judged.set()
        assert started.wait(10)
    finally:
        pool.close()


def test_a_long_calls_replacement_is_started_while_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(prewarm, "FILL_DELAY_S", 0.05)
    started = threading.Event()

    def start() -> ChildHandle:
        started.set()
        raise RuntimeError("no child in this test")

    pool = WarmPool(1, lambda handle: None)
    try:
        pool.fill(KEY, start, threading.Event())  # a call with no verdict yet
        assert started.wait(10)
    finally:
        pool.close()
