"""What real plugins do works in a call as it does outside: process pools,
shared memory between a call's processes, thread pools at small memory
limits, thread pools sized for the call's CPUs; and the memory this takes
is the call's own and counted in its limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from host.registry import PluginRegistry
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner
from tests.conftest import write_plugin

pytestmark = pytest.mark.timeout(120)

POOL = (
    "import multiprocessing\n"
    "with multiprocessing.Pool(2) as pool:\n"
    "    squares = pool.map(abs, [-1, -2, -3, -4])\n"
    "    workers = set(pool.starmap(os.getpid, [()] * 8))\n"
    "return {'squares': squares, 'workers': len(workers - {os.getpid()})}"
)

SHARED_MEMORY = (
    "from multiprocessing import shared_memory\n"
    "shm = shared_memory.SharedMemory(create=True, size=4096)\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    other = shared_memory.SharedMemory(name=shm.name)\n"
    "    other.buf[:13] = b'from the fork'\n"
    "    other.close()\n"
    "    os._exit(0)\n"
    "_, status = os.waitpid(pid, 0)\n"
    "seen = bytes(shm.buf[:13]).decode()\n"
    "shm.close()\n"
    "shm.unlink()\n"
    "return {'seen': seen, 'status': status}"
)

THREADS = (
    "import threading\n"
    "barrier = threading.Barrier(16, timeout=20)\n"
    "done = []\n"
    "def work(i):\n"
    "    barrier.wait()  # all fifteen threads exist at once\n"
    "    done.append(sum(range(10000)) + i)\n"
    "threads = [threading.Thread(target=work, args=(i,)) for i in range(15)]\n"
    "for thread in threads:\n"
    "    thread.start()\n"
    "barrier.wait()\n"
    "for thread in threads:\n"
    "    thread.join()\n"
    "return {'done': len(done)}"
)

CPUS = (
    "names = ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'PYTHON_CPU_COUNT')\n"
    "import concurrent.futures, multiprocessing\n"
    "with concurrent.futures.ThreadPoolExecutor() as pool:\n"
    "    workers = pool._max_workers\n"
    "return {\n"
    "    'affinity': sorted(os.sched_getaffinity(0)),\n"
    "    'cpu_count': os.cpu_count(),\n"
    "    'multiprocessing': multiprocessing.cpu_count(),\n"
    "    'variables': [os.environ.get(n) for n in names],\n"
    "    'thread_pool': workers,\n"
    "}"
)

SHM_LISTING = (
    "before = sorted(os.listdir('/dev/shm'))\n"
    "with open('/dev/shm/left-by-a-call', 'w') as f:\n"
    "    f.write('x')\n"
    "return {'before': before}"
)


def _run(
    runner: ToolRunner,
    registry: PluginRegistry,
    tmp_path: Path,
    payload: dict,
    name: str,
    body: str,
    memory_mb: int = 128,
) -> tuple[dict, dict]:
    directory = write_plugin(tmp_path, name, body, timeout_s=30, memory_mb=memory_mb)
    assert registry.load_directory(directory) == [name]
    return runner.run(name, payload)


def test_a_process_pool_maps_over_two_workers(
    runner: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    result, error = _run(runner, registry, tmp_path, payload, "pool_user", POOL)
    assert error == {}, error
    assert result == {"squares": [1, 2, 3, 4], "workers": result["workers"]}
    assert 1 <= result["workers"] <= 2


def test_shared_memory_passes_between_two_processes_of_a_call(
    runner: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    result, error = _run(runner, registry, tmp_path, payload, "shm_user", SHARED_MEMORY)
    assert error == {}, error
    assert result == {"seen": "from the fork", "status": 0}


def test_fifteen_threads_start_at_128_mb(
    runner: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    result, error = _run(runner, registry, tmp_path, payload, "threads_user", THREADS)
    assert error == {}, error
    assert result == {"done": 15}


def test_a_call_sizes_its_thread_pools_for_its_own_cpus(
    runner: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    result, error = _run(runner, registry, tmp_path, payload, "cpus_user", CPUS)
    assert error == {}, error
    cpus = min(2, len(os.sched_getaffinity(0)))  # HostLimits.cpus
    assert len(result["affinity"]) == cpus
    assert set(result["affinity"]) <= os.sched_getaffinity(0)
    assert result["cpu_count"] == result["multiprocessing"] == cpus
    assert result["variables"] == [str(cpus)] * 4
    assert result["thread_pool"] == min(32, cpus + 4)


def test_each_call_has_a_dev_shm_of_its_own(
    runner: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict
) -> None:
    planted = Path("/dev/shm/plughost-host-file")
    planted.write_text("the host's")
    try:
        first, error = _run(runner, registry, tmp_path, payload, "shm_lister", SHM_LISTING)
        assert error == {}, error
        second, error = runner.run("shm_lister", payload)
        assert error == {}, error
    finally:
        planted.unlink()
    # Neither the host's files nor what the first call left are there.
    assert first == second == {"before": []}
    assert not Path("/dev/shm/left-by-a-call").exists()


def test_memory_written_to_dev_shm_counts_against_the_limit(
    runner: ToolRunner, registry: PluginRegistry, tmp_path: Path, payload: dict, sandbox: Sandbox
) -> None:
    body = (
        "block = b'x' * (4 << 20)\n"
        "for index in range(64):  # 768 MB in files of 12 MB, if nothing stops it\n"
        "    with open(f'/dev/shm/hoard-{index}', 'wb') as f:\n"
        "        for _ in range(3):\n"
        "            f.write(block)\n"
        "            f.flush()\n"
        "    time.sleep(0.01)\n"
        "return {'held_mb': 768}"
    )
    result, error = _run(runner, registry, tmp_path, payload, "shm_hoard", body)
    assert result == {}
    # Counted: memory_limit; where no cgroup counts it, the tmpfs (the size
    # of the limit) is full first.
    counted = sandbox.active_layers()["cgroup_memory"]
    reason = "memory_limit" if counted else "plugin_raised"
    assert error["error"]["details"]["reason"] == reason, error
