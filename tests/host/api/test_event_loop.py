"""A slow job store (a database held back) never stalls the event loop:
while one client's request waits on the store, `/healthz` and other
clients are answered in their usual time, over real HTTP to a uvicorn
server on loopback. Each route that touches the store is held in turn;
a route that called the store on the event loop would hold every other
answer until the store let go (HOLD_S)."""

from __future__ import annotations

import inspect
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from host.api import Services, create_app
from host.api.console import console_router
from host.api.deps import STORE_THREADS
from host.api.routes import ROUTERS
from host.config import Settings
from host.registry import PluginRegistry
from host.services import AnalysisService, JobManagementService, PluginManagementService
from host.services.build import job_limits
from host.services.store import SQLiteJobStore
from sandbox.supervisor import Sandbox
from tests.served import served, timed

pytestmark = pytest.mark.timeout(300)
HOLD_S = 20.0  # how long the store keeps a caller waiting, at most
ANSWERED_S = 5.0  # far under HOLD_S: a stalled loop could not answer in it
REACHED_S = 10.0  # how long a request may take to reach the held store
FINISHED_S = 30.0  # how long a job may take to finish, unheld
# A real lock on the SQLite file: a writer waits for it up to SQLite's busy
# timeout (5 s, Python's default), then fails. A submission still waiting
# LOCKED_S after it was sent is waiting for the lock (unlocked it takes
# milliseconds); a loop it stalled would answer no one for seconds more.
LOCKED_S = 1.0
LOCKED_ANSWERED_S = 2.0


class HeldStore:
    """A SQLite job store that can be held back: while held, every call
    waits (at most HOLD_S) before it reaches the database."""

    def __init__(self, store: SQLiteJobStore) -> None:
        self._store = store
        self._open = threading.Event()
        self._open.set()
        self.waiting = threading.Event()
        self._count = threading.Lock()
        self.held = 0  # calls waiting now

    def hold(self) -> None:
        self.waiting.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if not callable(attribute):
            return attribute

        def held(*args: Any, **kwargs: Any) -> Any:
            if not self._open.is_set():
                with self._count:
                    self.held += 1
                self.waiting.set()
                self._open.wait(HOLD_S)
                with self._count:
                    self.held -= 1
            return attribute(*args, **kwargs)

        return held


Request = Callable[[httpx.Client, str], httpx.Response]


def _requests(body: dict[str, Any], png: bytes) -> dict[str, tuple[Request, int]]:
    """Each route that touches the store: how to call it (given a finished
    job's id) and the status it answers once the store lets go."""
    upload = {"file": ("a.png", png, "image/png")}
    return {
        "analyze": (lambda c, _: c.post("/v1/analyze", json=body), 200),
        "analyze upload": (lambda c, _: c.post("/v1/analyze/upload", files=upload), 200),
        "submit a job": (lambda c, _: c.post("/v1/jobs", json=body), 202),
        "list jobs": (lambda c, _: c.get("/v1/jobs"), 200),
        "get a job": (lambda c, job: c.get(f"/v1/jobs/{job}"), 200),
        "cancel a finished job": (lambda c, job: c.delete(f"/v1/jobs/{job}"), 409),
        "console jobs": (lambda c, _: c.get("/console/jobs"), 200),
        "console job": (lambda c, job: c.get(f"/console/jobs/{job}"), 200),
    }


ROUTES = list(_requests({}, b""))


@pytest.fixture
def server(
    registry: PluginRegistry, sandbox: Sandbox, tmp_path: Path
) -> Iterator[tuple[str, HeldStore]]:
    """A single node on an SQLite store that can be held back: its base URL and store."""
    config = Settings(self_check=False)
    store = HeldStore(SQLiteJobStore(str(tmp_path / "jobs.sqlite3")))
    plugins = PluginManagementService(registry, sandbox)
    jobs = JobManagementService(plugins, store, workers=2, queue_size=8, limits=job_limits(config))  # type: ignore[arg-type]
    services = Services(plugins, jobs, AnalysisService(jobs, "image_info"))
    with served(create_app(config, services)) as base:
        yield base, store


def finished_job(client: httpx.Client, body: dict[str, Any]) -> str:
    """The id of a job submitted and waited for to its end."""
    job = client.post("/v1/jobs", json=body).json()["job"]["id"]
    deadline = time.monotonic() + FINISHED_S
    while client.get(f"/v1/jobs/{job}").json()["status"] in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, f"job {job} did not finish in {FINISHED_S} s"
        time.sleep(0.05)
    return str(job)


@pytest.mark.parametrize("route", ROUTES)
def test_a_held_store_stalls_neither_healthz_nor_other_clients(
    server: tuple[str, HeldStore], body: dict[str, Any], png: bytes, route: str
) -> None:
    base, store = server
    request, status = _requests(body, png)[route]
    held = httpx.Client(base_url=base, timeout=HOLD_S + 30)
    other = httpx.Client(base_url=base, timeout=HOLD_S + 30)
    job = finished_job(other, body)
    usual = {path: timed(other, path) for path in ("/healthz", "/v1/plugins/image_info")}
    answers: list[httpx.Response] = []
    store.hold()
    waiter = threading.Thread(target=lambda: answers.append(request(held, job)))
    waiter.start()
    try:
        assert store.waiting.wait(REACHED_S), f"{route} never reached the store"
        took = {path: timed(other, path) for path in usual}
        waited = waiter.is_alive()
    finally:
        store.release()
        waiter.join(HOLD_S + 30)
        held.close()
        other.close()
    assert all(t < ANSWERED_S for t in took.values()), (
        f"while {route} waited on the store: {took} (unheld: {usual})"
    )
    assert waited, f"{route} did not wait for the store"
    assert answers, f"{route} got no answer"
    assert answers[0].status_code == status, (route, answers[0].status_code, answers[0].text[:300])


def test_requests_waiting_on_a_held_store_leave_threads_for_the_other_routes(
    server: tuple[str, HeldStore], body: dict[str, Any]
) -> None:
    """More requests wait on the store than it has threads: they queue for
    the store's threads, and a plain `def` route still gets one of its own."""
    base, store = server
    count = STORE_THREADS + 10
    with httpx.Client(base_url=base, timeout=HOLD_S + 30) as other:
        job = finished_job(other, body)
        usual = timed(other, "/v1/plugins/image_info")
        answers: list[int] = []
        store.hold()
        waiters = [
            threading.Thread(
                target=lambda: answers.append(
                    httpx.get(f"{base}/v1/jobs/{job}", timeout=HOLD_S + 30).status_code
                )
            )
            for _ in range(count)
        ]
        try:
            for waiter in waiters:
                waiter.start()
            deadline = time.monotonic() + REACHED_S * 3
            while store.held < STORE_THREADS:
                assert time.monotonic() < deadline, f"{store.held} requests reached the store"
                time.sleep(0.02)
            took = timed(other, "/v1/plugins/image_info")
        finally:
            store.release()
            for waiter in waiters:
                waiter.join(HOLD_S + 30)
    assert took < ANSWERED_S, f"with {count} requests held: {took:.1f} s (unheld: {usual:.2f})"
    assert answers == [200] * count


def test_a_locked_sqlite_file_stalls_neither_healthz_nor_other_clients(
    server: tuple[str, HeldStore], body: dict[str, Any], tmp_path: Path
) -> None:
    """Another process's write lock on the job database (`BEGIN EXCLUSIVE`)
    holds a submission's insert; /healthz and other clients are answered."""
    base, _ = server
    answers: list[httpx.Response] = []
    with (
        httpx.Client(base_url=base, timeout=30) as held,
        httpx.Client(base_url=base, timeout=30) as other,
    ):
        usual = {path: timed(other, path) for path in ("/healthz", "/v1/plugins/image_info")}
        locker = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None, timeout=5)
        waiter = threading.Thread(target=lambda: answers.append(held.post("/v1/jobs", json=body)))
        try:
            locker.execute("BEGIN EXCLUSIVE")
            waiter.start()
            waiter.join(LOCKED_S)
            took = {path: timed(other, path) for path in usual}
            waited = waiter.is_alive()
        finally:
            locker.execute("ROLLBACK")
            locker.close()
            if waiter.ident is not None:
                waiter.join(30)
    assert all(t < LOCKED_ANSWERED_S for t in took.values()), (
        f"while a submission waited on the locked file: {took} (unlocked: {usual})"
    )
    assert waited, "the submission did not wait for the lock"
    assert answers and answers[0].status_code == 202, answers[0].text[:300] if answers else None


# What runs on the event loop, each read for store and database calls (the
# store-bound routes hand them to in_store_thread, and are held back above):
# a new coroutine route or dependency is added here after the same reading.
LOOP_ROUTES = {
    "analyze",
    "analyze_upload",
    "batch",  # the console's pages read the store in_store_thread
    "batches",
    "cancel_batch",
    "callback_secret",  # the host secret (a file, or PostgreSQL) is read in_store_thread
    "cancel_job",
    "create_batch",
    "create_job",
    "get_batch",
    "get_job",
    "healthz",
    "job",
    "jobs",
    "list_batches",
    "list_jobs",
}
LOOP_DEPENDENCIES = {
    "analyze_body",
    "get_services",
    "get_settings",
    "note_visitor",
    "require_admin",
    "require_client",
}


def _dependencies(dependant: Dependant) -> Iterator[Dependant]:
    for dependency in dependant.dependencies:
        yield dependency
        yield from _dependencies(dependency)


def test_only_reviewed_routes_and_dependencies_run_on_the_event_loop() -> None:
    routes = [
        route
        for router in (*ROUTERS, console_router(Settings(self_check=False)))
        for route in router.routes
        if isinstance(route, APIRoute)
    ]
    coroutines = {
        route.endpoint.__name__ for route in routes if inspect.iscoroutinefunction(route.endpoint)
    }
    assert coroutines == LOOP_ROUTES
    dependencies = {
        getattr(d.call, "__name__", repr(d.call))
        for route in routes
        for d in _dependencies(route.dependant)
        if d.call is not None and inspect.iscoroutinefunction(d.call)
    }
    assert dependencies == LOOP_DEPENDENCIES
