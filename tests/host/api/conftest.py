from __future__ import annotations

import base64
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from host.api import Services, create_app
from host.config import Settings
from host.registry import PluginRegistry
from host.services import (
    AnalysisService,
    JobManagementService,
    MemoryJobStore,
    PluginManagementService,
)
from host.services.build import job_limits
from host.services.store import JobStore
from sandbox.supervisor import Sandbox


@pytest.fixture
def make_client(registry: PluginRegistry, sandbox: Sandbox) -> Iterator[Callable[..., TestClient]]:
    made: list[TestClient] = []

    def make(
        workers: int = 2, queue_size: int = 8, store: JobStore | None = None, **settings: object
    ) -> TestClient:
        settings.setdefault("self_check", False)  # tests/host/test_crashsuite.py covers it
        config = Settings(**settings)
        plugins = PluginManagementService(registry, sandbox)
        jobs = JobManagementService(
            plugins,
            store or MemoryJobStore(),
            workers=workers,
            queue_size=queue_size,
            limits=job_limits(config),
        )
        services = Services(plugins, jobs, AnalysisService(jobs, "image_info"))
        client = TestClient(create_app(config, services), raise_server_exceptions=False)
        client.__enter__()
        made.append(client)
        return client

    yield make
    for client in made:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture
def body(png: bytes) -> dict[str, object]:
    return {"image": base64.b64encode(png).decode(), "mime_type": "image/png", "options": {}}
