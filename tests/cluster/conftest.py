"""Fixtures of the multi-node tests (the PostgreSQL server and a fresh
database per test are tests/conftest.py's `pg` and `db_url`): worker nodes as real processes (killed
and reaped at the end), and an API node's services in this process."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from host.config import Settings
from host.services.build import Services, build_services
from sandbox.supervisor import uid_range
from tests.cluster.pg import NEEDS_POSTGRES
from tests.conftest import write_plugin

ROOT = Path(__file__).resolve().parents[2]
# Short enough that a killed node's job is retried within seconds.
FAST = {"PLUGHOST_HEARTBEAT_S": "0.5", "PLUGHOST_STALLED_AFTER_S": "3"}
# What every multi-node test module marks itself with: the nodes are processes
# of their own (the leak check counts this process's children), and they need
# root and PostgreSQL.
CLUSTER = [pytest.mark.no_leak_check, NEEDS_POSTGRES]


@pytest.fixture
def plugins_dir(tmp_path: Path) -> Path:
    """Trivial plugins: `echo` (instant), `nap` (sleeps options.s), `dies` (crashes)."""
    root = tmp_path / "plugins"
    write_plugin(root, "echo", 'return {"size": len(payload["image"])}')
    write_plugin(
        root,
        "nap",
        'time.sleep(payload["options"].get("s", 1))\nreturn {"slept": True}',
        timeout_s=60,
    )
    write_plugin(root, "dies", "os._exit(3)")
    return root


def live_workers(services: Services) -> int:
    """Worker nodes with a fresh heartbeat, as an API node sees them."""
    return sum(1 for n in services.nodes() if n["role"] == "worker" and n["healthy"])


# Each worker process gets a uid range of its own, as separate machines
# would have: a killed node's last call may still be dying when the next
# node starts, and must not share a uid with that node's calls.
_UID_RANGES = itertools.count(1)


class Workers:
    """Worker nodes started as `python -m host.cli worker` processes."""

    def __init__(self, url: str, plugins: Path, logs: Path) -> None:
        self.url = url
        self.plugins = plugins
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, *extra: str, env: dict[str, str] | None = None, prefix: list[str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.logs / f"worker-{len(self.procs)}.log"
        with log.open("wb") as stream:
            proc = subprocess.Popen(
                [
                    *(prefix or []),
                    sys.executable,
                    "-m",
                    "host.cli",
                    "worker",
                    "--database-url",
                    self.url,
                    "--plugins-dir",
                    str(self.plugins),
                    "--log-level",
                    "warning",
                    *extra,
                ],
                stdout=stream,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={
                    **os.environ,
                    **FAST,
                    "PYTHONPATH": str(ROOT),
                    "PLUGHOST_UID_BASE": str(uid_range().start + 1024 * (next(_UID_RANGES) % 48)),
                    **(env or {}),
                },
            )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def workers(db_url: str, plugins_dir: Path, tmp_path: Path) -> Iterator[Workers]:
    found = Workers(db_url, plugins_dir, tmp_path)
    yield found
    found.stop_all()


@pytest.fixture
def api(db_url: str, plugins_dir: Path) -> Iterator[Callable[..., Services]]:
    """Build an API node's services (keyword arguments: more settings)."""
    built: list[Services] = []

    def make(**settings: object) -> Services:
        merged = {
            "database_url": db_url,
            "plugins_dirs": [str(plugins_dir)],
            "heartbeat_s": 0.5,
            "stalled_after_s": 3.0,
            "prewarm": 0,
            **settings,
        }
        services = build_services(Settings.model_validate(merged))
        built.append(services)
        return services

    yield make
    for services in built:
        services.jobs.shutdown()
        services.plugins.close()
