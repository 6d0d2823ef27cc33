"""The job store's files are private from the first byte, inputs are stored
as raw bytes and read back only when a job runs, and the database stays
within its size and gives pruned space back to the file system."""

from __future__ import annotations

import base64
import gc
import os
import sqlite3
import stat
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from host.registry import PluginRegistry
from host.services import (
    JobLimits,
    JobManagementService,
    JobStatus,
    PluginManagementService,
    SQLiteJobStore,
)
from sandbox.supervisor import Sandbox

MiB = 1024 * 1024


@pytest.fixture
def plugins(registry: PluginRegistry, sandbox: Sandbox) -> PluginManagementService:
    return PluginManagementService(registry, sandbox)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The umask most services start with: files 0644, directories 0755."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def results_of(
    monkeypatch: pytest.MonkeyPatch, size: int, gate: threading.Event | None = None
) -> None:
    """Every plugin call returns a result of about `size` bytes of JSON (once
    `gate`, if given, is set)."""

    def fake(
        self: PluginManagementService,
        plugin_name: str,
        payload: Any,
        cancel: Any = None,
        owner: Any = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if gate is not None:
            assert gate.wait(30)
        return {"blob": "x" * size}, {}

    monkeypatch.setattr(PluginManagementService, "execute_plugin", fake)


def on_disk(db: Path) -> int:
    """Bytes of the database and its WAL."""
    wal = db.with_name(db.name + "-wal")
    return db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


@pytest.mark.usefixtures("loose_umask")
def test_store_files_are_private_from_the_first_write(
    plugins: PluginManagementService, payload: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    db = state / "jobs.sqlite3"
    jobs = JobManagementService(plugins, SQLiteJobStore(db))
    results_of(monkeypatch, 10)
    try:
        jobs.enqueue("image_info", payload)[1].result(timeout=30)  # before any close
        probe = sqlite3.connect(db)
        assert probe.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        probe.close()
        paths = [state, db, state / "jobs.sqlite3-wal", state / "jobs.sqlite3-shm"]
        modes = {p.name: stat.filemode(p.stat().st_mode) for p in paths}
        assert all(p.stat().st_mode & 0o077 == 0 for p in paths), modes
    finally:
        jobs.shutdown(timeout_s=5)


def test_existing_store_files_are_made_private(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        path = tmp_path / f"jobs.sqlite3{suffix}"
        path.touch()
        path.chmod(0o644)
    store = SQLiteJobStore(db)  # in WAL mode from here: all three files in use
    try:
        modes = {p.name: stat.filemode(p.stat().st_mode) for p in tmp_path.iterdir()}
        assert len(modes) == 3 and all(m == "-rw-------" for m in modes.values()), modes
    finally:
        store.close()


def test_image_is_stored_as_raw_bytes_and_dropped_when_the_job_ends(
    plugins: PluginManagementService, png: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "jobs.sqlite3"
    jobs = JobManagementService(plugins, SQLiteJobStore(db))
    gate = threading.Event()
    results_of(monkeypatch, 10, gate)
    try:
        payload = {"image": base64.b64encode(png).decode(), "mime_type": "image/png"}
        job, future = jobs.enqueue("image_info", payload)  # held at the gate while we look
        probe = sqlite3.connect(db)
        rows = probe.execute("SELECT * FROM jobs").fetchall()
        blobs = [v for v in rows[0] if isinstance(v, bytes)]
        assert blobs == [png]  # the image itself, not its base64 text
        assert payload["image"] not in str(rows)
        gate.set()
        assert future.result(timeout=30).status is JobStatus.SUCCESS
        rows = probe.execute("SELECT * FROM jobs").fetchall()
        assert not [v for v in rows[0] if isinstance(v, bytes)] and "mime_type" not in str(rows)
        probe.close()
    finally:
        jobs.shutdown(timeout_s=5)


def test_queued_jobs_hold_their_ids_not_their_inputs_in_memory(
    plugins: PluginManagementService, png: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    results_of(monkeypatch, 10, release)
    jobs = JobManagementService(
        plugins, SQLiteJobStore(tmp_path / "jobs.sqlite3"), workers=1, queue_size=8
    )
    image = png + os.urandom(2 * MiB)  # a valid PNG header and 2 MiB that are not compressible
    try:
        jobs.enqueue("image_info", {"image": png, "mime_type": "image/png"})  # the busy worker
        gc.collect()
        tracemalloc.start()
        futures = []
        for _ in range(8):
            payload = {"image": base64.b64encode(image).decode(), "mime_type": "image/png"}
            job, future = jobs.enqueue("image_info", payload)
            futures.append((job, future))
            del payload
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"8 queued jobs of 2 MiB each hold {held / MiB:.2f} MiB")
        assert held < 2 * MiB  # not even one input
        release.set()
        # Each input was read back from the store when its job ran.
        assert all(f.result(10).status is JobStatus.SUCCESS for _, f in futures)
    finally:
        tracemalloc.stop()
        release.set()
        jobs.shutdown(timeout_s=10)


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the store of a pruning test lives; every job's result is 0.5 MB."""
    results_of(monkeypatch, 500_000)
    return tmp_path / "jobs.sqlite3"


@pytest.mark.timeout(120)
def test_pruning_shrinks_the_database_file(
    plugins: PluginManagementService, payload: dict, db: Path
) -> None:
    store = SQLiteJobStore(db)
    jobs = JobManagementService(plugins, store)
    try:
        for _ in range(40):
            jobs.enqueue("image_info", payload)[1].result(timeout=30)
        full = on_disk(db)
        time.sleep(0.01)
        assert store.prune(older_than_s=0.001) == 40
        empty = on_disk(db)
        print(f"database and WAL: {full / MiB:.1f} MiB full, {empty / MiB:.2f} MiB pruned")
        assert full > 20 * MiB and empty < full / 10
    finally:
        jobs.shutdown(timeout_s=5)


@pytest.mark.timeout(120)
def test_the_store_prunes_its_oldest_finished_jobs_past_max_db_bytes(
    plugins: PluginManagementService, payload: dict, db: Path
) -> None:
    store = SQLiteJobStore(db)
    limits = JobLimits(max_db_bytes=8 * MiB)
    jobs = JobManagementService(plugins, store, workers=1, queue_size=1, limits=limits)
    try:
        ids = []
        for _ in range(60):  # 30 MB of results in all
            job, future = jobs.enqueue("image_info", payload)
            future.result(10)
            ids.append(job.id)
        size = store.size_bytes()
        print(f"60 results of 0.5 MB with max_db_bytes 8 MiB: {size / MiB:.1f} MiB in use")
        # One finished result may land after the last check, no more.
        assert size <= 8 * MiB + MiB and on_disk(db) <= 8 * MiB + 64 * MiB
        kept = [job_id for job_id in ids if store.get(job_id) is not None]
        assert kept and kept == ids[-len(kept) :]  # the newest stay, the oldest went
        assert len(kept) < 30
    finally:
        jobs.shutdown(timeout_s=5)


def test_owner_usage_follows_every_write(tmp_path: Path) -> None:
    # The quota check reads each owner's usage from a table its triggers keep;
    # after adds, results stored, inputs dropped, prunes and a reopen it must
    # equal the sum over the owner's jobs.
    from dataclasses import replace

    from host.services.store import Job, now_iso

    path = tmp_path / "jobs.sqlite3"
    store = SQLiteJobStore(path)

    def truth() -> dict[str, tuple[int, int]]:
        db = sqlite3.connect(path)
        try:
            rows = db.execute(
                "SELECT owner, COUNT(*), SUM(stored_bytes) FROM jobs GROUP BY owner"
            ).fetchall()
        finally:
            db.close()
        return {owner: (jobs, size) for owner, jobs, size in rows}

    def usage() -> dict[str, tuple[int, int]]:
        found = {o: store.usage(o) for o in ("alice", "bob", "carol")}
        return {o: (u.jobs, u.stored_bytes) for o, u in found.items() if u.jobs}

    payload = {"image": b"x" * 1000, "mime_type": "image/png", "options": {}}
    jobs = []
    for index in range(30):
        owner = ("alice", "bob", "carol")[index % 3]
        job = Job(id=f"job{index}", plugin="p", status=JobStatus.PENDING,
                  created_at=now_iso(), owner=owner)  # fmt: skip
        store.add(job, payload)
        jobs.append(job)
    assert usage() == truth()
    for job in jobs[:20]:
        store.update(replace(job, status=JobStatus.SUCCESS, finished_at=now_iso(),
                             result={"n": "y" * 50}))  # fmt: skip
    assert usage() == truth()
    assert store.prune_owner("alice", 3, 10**9) > 0
    assert usage() == truth()
    store.prune(older_than_s=0)
    assert usage() == truth()
    store.close()
    store = SQLiteJobStore(path)
    assert usage() == truth()
    store.close()
