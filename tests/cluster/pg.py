"""A private PostgreSQL cluster for tests: a system user (PostgreSQL refuses
to run as root), initdb in a temporary directory, a server on the given
addresses and a free port, stopped and removed at the end. Every wait has a
deadline."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from tests.conftest import ensure_user

BIN = Path("/usr/lib/postgresql/15/bin")
USER = "plughost-pg"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
# What a test that starts PostgreSQL is marked with.
NEEDS_POSTGRES = pytest.mark.skipif(
    os.geteuid() != 0 or not (BIN / "initdb").exists(),
    reason="needs root and PostgreSQL 15 (make test installs it)",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """One PostgreSQL server of the test run's own."""

    def __init__(self, listen: str = "127.0.0.1", trust: str = "127.0.0.1/32") -> None:
        uid = ensure_user(USER)
        self.listen = listen
        self.port = free_port()
        self.top = Path(tempfile.mkdtemp(prefix="plughost-pg-"))
        os.chown(self.top, uid, -1)
        self.data = self.top / "data"
        self._as_user(
            [
                str(BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            timeout=120,
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '{listen}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.top}'\nfsync = off\n"
                "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
            )
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {trust} trust\n")
        self.start()
        self.url = f"postgresql://postgres@{listen.split(',')[0]}:{self.port}/postgres"

    def _as_user(self, argv: list[str], timeout: float) -> None:
        subprocess.run(
            [RUNUSER, "-u", USER, "--", *argv],
            check=True,
            timeout=timeout,
            capture_output=True,
            cwd=self.top,
        )

    def start(self) -> None:
        self._as_user(
            [
                str(BIN / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.top / "log"),
                "-w",
                "-t",
                "60",
                "start",
            ],
            timeout=90,
        )

    def stop(self, mode: str = "fast") -> None:
        self._as_user(
            [str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"],
            timeout=90,
        )

    def database(self, name: str) -> str:
        """A fresh database on this server; its URL."""
        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + "/" + name

    def close(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # not running
        finally:
            shutil.rmtree(self.top, ignore_errors=True)


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.05):  # type: ignore[no-untyped-def]
    """Call `predicate` until it returns something true; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)
