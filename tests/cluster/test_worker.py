"""A worker node records a job's end as a single node does
(host/services/finished.py): for the same outcome of a call, the row a
worker node writes and the job a single node stores are the same record."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from host.cluster.pgstore import PgJobStore
from host.cluster.schema import ensure_schema
from host.cluster.worker import WorkerNode, WorkerOptions
from host.errors import envelope
from host.registry import PluginRegistry
from host.services import JobManagementService, JobStatus, MemoryJobStore, PluginManagementService
from host.services.store import Job, now_iso
from sandbox.supervisor import Sandbox
from tests.cluster.conftest import CLUSTER
from tests.host.services.test_runners import calls_end_with, stored_record

pytestmark = CLUSTER
PLUGIN = "image_info"
# A reply with no reason reads as the host's own failure on every path.
HALF_AN_ENVELOPE = {"error": {"type": "PluginError", "message": "half", "details": {}}}


class NoAbort:
    """A Procrastinate job context nobody asked to abort."""

    def abort_reason(self) -> None:
        return None


@pytest.fixture
def node(db_url: str, registry: PluginRegistry, sandbox: Sandbox) -> Iterator[WorkerNode]:
    ensure_schema(db_url)
    found = WorkerNode(WorkerOptions(database_url=db_url, concurrency=1), registry, sandbox)
    yield found
    found.pool.close()  # the sandbox is the test run's: not closed here


@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        (({"w": 1}, {}), JobStatus.SUCCESS),
        (({}, envelope("cancelled", "stopped", plugin=PLUGIN)), JobStatus.CANCELLED),
        (({}, envelope("timeout", "too slow", plugin=PLUGIN, limit_s=1)), JobStatus.FAILED),
        (({}, HALF_AN_ENVELOPE), JobStatus.FAILED),
    ],
    ids=["success", "cancelled", "failed", "half-an-envelope"],
)
def test_a_worker_node_and_a_single_node_store_the_same_record(
    node: WorkerNode,
    registry: PluginRegistry,
    sandbox: Sandbox,
    payload: dict,
    monkeypatch: pytest.MonkeyPatch,
    outcome: tuple[dict, dict],
    status: JobStatus,
) -> None:
    calls_end_with(monkeypatch, outcome)
    local = JobManagementService(PluginManagementService(registry, sandbox), MemoryJobStore())
    try:
        here = local.run_job(local.create_job(PLUGIN, payload, owner="alice").id)
    finally:
        local.shutdown()

    pending = Job(
        id=uuid.uuid4().hex,
        plugin=PLUGIN,
        status=JobStatus.PENDING,
        created_at=now_iso(),
        owner="alice",
    )
    store: PgJobStore = node.store
    store.add(pending, payload)
    node.handle(pending.id, NoAbort())  # type: ignore[arg-type]
    there = store.get(pending.id)

    assert there is not None and there.status is status and here.status is status
    assert stored_record(there) == stored_record(here)
    assert store.payload(pending.id) is None  # the input goes with the end
