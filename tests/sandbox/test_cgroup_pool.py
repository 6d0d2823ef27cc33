"""The cgroups a root host keeps for each per-call uid (sandbox.cgroups.CgroupPool):
each call gets its own limits, is judged by its own OOM kills, and finds
no process of an earlier call in them."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.cgroups import CallCgroup, CgroupPool
from sandbox.supervisor import uid_range

V1 = {"cgroup_memory": True, "cgroup_pids": True}
MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    not all(Path(f"/sys/fs/cgroup/{c}").is_dir() for c in ("memory", "pids")) or os.geteuid(),
    reason="needs root and the cgroup v1 memory and pids controllers",
)


@pytest.fixture
def pool() -> Iterator[CgroupPool]:
    made = CgroupPool(V1, None)
    yield made
    made.close()


def _join(cgroup: CallCgroup) -> None:
    for path in cgroup.procs_files:
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, b"0")
        os.close(fd)


def _member(cgroup: CallCgroup, body: str) -> int:
    """A process in `cgroup` that runs `body` ("sleep" or "allocate")."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _join(cgroup)
            os.write(ready_w, b"1")
            if body == "allocate":
                block = bytearray(4 * cgroup.memory_bytes)
                for offset in range(0, len(block), 4096):
                    block[offset] = 1
            time.sleep(30)
        finally:
            os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    return pid


def _limit(cgroup: CallCgroup, kind: str, name: str) -> int:
    return int((cgroup.dirs[kind] / name).read_text())


def test_a_uids_cgroup_is_kept_and_gets_each_calls_limits(pool: CgroupPool) -> None:
    uid = uid_range().start
    first = pool.take(uid, 64 * MiB, 16)
    assert first.empty()
    pool.give_back(first)
    assert pool.kept() == [first]
    lower = pool.take(uid, 32 * MiB, 8)
    assert lower is first and pool.kept() == []
    assert _limit(lower, "memory", "memory.limit_in_bytes") == 32 * MiB
    assert _limit(lower, "pids", "pids.max") == 8
    pool.give_back(lower)
    higher = pool.take(uid, 96 * MiB, 20)  # memsw, where kept, is raised first
    assert _limit(higher, "memory", "memory.limit_in_bytes") == 96 * MiB
    swap = higher.dirs["memory"] / "memory.memsw.limit_in_bytes"
    if swap.exists():
        assert int(swap.read_text()) == 96 * MiB
    other = pool.take(uid + 1, 96 * MiB, 20)
    assert other.dirs["memory"] != higher.dirs["memory"]
    pool.give_back(higher)
    pool.give_back(other)
    dirs = [path for c in (higher, other) for path in c.dirs.values()]
    pool.close()
    assert not any(path.exists() for path in dirs)


def test_a_call_is_judged_by_its_own_oom_kills(pool: CgroupPool) -> None:
    uid = uid_range().start
    cgroup = pool.take(uid, 16 * MiB, 16)
    pid = _member(cgroup, "allocate")
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert cgroup.oom_killed()
    pool.give_back(cgroup)
    again = pool.take(uid, 16 * MiB, 16)
    assert again is cgroup
    assert not again.oom_killed()  # the kill was the earlier call's
    pid = _member(again, "allocate")
    os.waitpid(pid, 0)
    assert again.oom_killed()
    pool.give_back(again)


def test_a_calls_peak_is_its_own(pool: CgroupPool) -> None:
    uid = uid_range().start
    cgroup = pool.take(uid, 16 * MiB, 16)
    pid = _member(cgroup, "allocate")  # to the limit, killed there
    os.waitpid(pid, 0)
    peak = cgroup.peak_bytes()
    assert peak is not None and peak > 12 * MiB
    pool.give_back(cgroup)
    again = pool.take(uid, 16 * MiB, 16)
    assert again is cgroup
    pid = _member(again, "sleep")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    peak = again.peak_bytes()
    assert peak is not None and peak < 8 * MiB  # not the earlier call's 16 MiB
    pool.give_back(again)


def test_a_process_left_in_a_uids_cgroup_is_killed_before_the_next_call(
    pool: CgroupPool,
) -> None:
    uid = uid_range().start
    cgroup = pool.take(uid, 64 * MiB, 16)
    pid = _member(cgroup, "sleep")
    pool.give_back(cgroup)  # the call is over, but a process lingers in it
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert pool.kept() == [cgroup] and cgroup.empty()


def test_a_cgroup_given_back_after_the_host_closed_is_removed(pool: CgroupPool) -> None:
    cgroup = pool.take(uid_range().start, 64 * MiB, 16)
    pool.close()
    pool.give_back(cgroup)
    assert pool.kept() == []
    assert not any(path.exists() for path in cgroup.dirs.values())


def test_calls_without_a_uid_of_their_own_get_new_cgroups(pool: CgroupPool) -> None:
    first = pool.take(None, 64 * MiB, 16)
    second = pool.take(None, 64 * MiB, 16)
    assert first.dirs["memory"] != second.dirs["memory"]
    dirs = [path for c in (first, second) for path in c.dirs.values()]
    pool.give_back(first)
    pool.give_back(second)
    assert pool.kept() == [] and not any(path.exists() for path in dirs)


def test_cgroup_v2_calls_get_new_cgroups(tmp_path: Path) -> None:
    made = CgroupPool(V1, tmp_path)  # a v2-shaped place: memory.peak is per cgroup
    first = made.take(uid_range().start, 64 * MiB, 16)
    second = made.take(uid_range().start, 64 * MiB, 16)
    assert first.dirs["unified"] != second.dirs["unified"]
    assert first.uid is None and second.uid is None  # never kept


FILL_CACHE = """
read = 0
for top, _, names in os.walk('/usr/lib'):
    for name in names:
        try:
            with open(os.path.join(top, name), 'rb') as stream:
                # Dropped from the cache first, so that reading it charges
                # this call's cgroup, not the one that read it before.
                os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                while chunk := stream.read(1 << 20):
                    read += len(chunk)
        except OSError:
            continue
        if read > 3 * 128 * 2**20:
            return {'read': read}
return {'read': read}
"""
NEAR_LIMIT = """
block = bytearray(70 * 2**20)
for offset in range(0, len(block), 4096):
    block[offset] = 1
return {'held': len(block)}
"""


def test_page_cache_a_call_leaves_in_its_uids_cgroup_does_not_count_against_the_next(
    registry, sandbox, tmp_path: Path, payload: dict
) -> None:
    from sandbox.tool_runner import ToolRunner
    from tests.conftest import write_plugin

    # An attacker's call reads three times its memory limit from files, to
    # leave its uid's kept cgroup full of page cache; the uid's next call
    # still gets its whole limit.
    for name, body in (("fill_cache", FILL_CACHE), ("near_limit", NEAR_LIMIT)):
        registry.load_directory(write_plugin(tmp_path, name, body, timeout_s=20, memory_mb=128))
    runner = ToolRunner(registry, sandbox)
    for _ in range(3):
        sandbox.settle()  # the same (lowest free) uid, so the same cgroups
        result, error = runner.run("fill_cache", payload)
        assert error == {} and result["read"] > 3 * 128 * 2**20
        sandbox.settle()
        charged = [
            int((path / "memory.usage_in_bytes").read_text())
            for path in sandbox.kept_cgroups()
            if path.parent.parent.name == "memory"
        ]
        assert max(charged) > 96 * 2**20  # the attack worked: its cache is still charged
        result, error = runner.run("near_limit", payload)
        assert error == {}, error
        assert result == {"held": 70 * 2**20}


def test_a_cgroup_that_cannot_be_removed_yet_is_removed_at_a_later_call(tmp_path: Path) -> None:
    # On a slow machine a failed call's process may still be exiting when its
    # cgroup is given back: rmdir refuses, and the cgroup was left for good.
    made = CgroupPool(V1, tmp_path)  # a v2-shaped place whose files make rmdir refuse
    first = made.take(None, 64 * MiB, 16)
    made.give_back(first)
    assert made.leftovers() == [first] and first.dirs["unified"].exists()
    for entry in first.dirs["unified"].iterdir():  # the process is gone now
        entry.unlink()
    second = made.take(None, 64 * MiB, 16)
    assert made.leftovers() == [] and not first.dirs["unified"].exists()
    for entry in second.dirs["unified"].iterdir():
        entry.unlink()
    made.give_back(second)
    made.close()
    assert list(tmp_path.iterdir()) == []
