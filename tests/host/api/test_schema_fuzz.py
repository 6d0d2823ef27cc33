"""Fuzzing driven by the API's own OpenAPI schema (schemathesis): whatever
the schema lets a client send, and whatever it mutates around that, the
server never answers with a 5xx."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings

from host.api import Services, create_app
from host.config import Settings
from host.discovery import discover
from host.preparation import environment_store
from host.registry import PluginRegistry
from host.services import (
    AnalysisService,
    JobManagementService,
    MemoryJobStore,
    PluginManagementService,
)
from sandbox.supervisor import Sandbox
from tests.conftest import ENV_DIR

_registry = PluginRegistry()
_registry.environments = environment_store(ENV_DIR)  # prepared once for the run
discover(_registry)
_sandbox = Sandbox()  # the schema needs the app at import; closed after the module
_plugins = PluginManagementService(_registry, _sandbox)
_jobs = JobManagementService(_plugins, MemoryJobStore(), workers=2, queue_size=512)
APP = create_app(
    Settings(self_check=False, admin_token="admin-token"),
    Services(_plugins, _jobs, AnalysisService(_jobs)),
)


@asynccontextmanager
async def _services_outlive_each_test(app: FastAPI) -> AsyncIterator[None]:
    # schemathesis ends the app's lifespan after each operation's test, which
    # would shut the job service down for the next ones (each of them then
    # refused as overloaded): the module's services end with the module.
    yield


APP.router.lifespan_context = _services_outlive_each_test
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture
def sandbox() -> Sandbox:
    """The sandbox the app's calls run in, which the leak check looks at."""
    return _sandbox


@pytest.fixture(autouse=True)
def _jobs_end_with_their_test() -> Iterator[None]:
    # The schema's examples are valid bodies: the jobs a test queues run
    # after it answered, and end before the leak check looks.
    yield
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        stats = _jobs.stats()
        if not stats["running"] and not stats["queued"]:
            break
        time.sleep(0.05)


@pytest.fixture(scope="module", autouse=True)
def _close_sandbox() -> Iterator[None]:
    yield
    _jobs.shutdown(timeout_s=5)
    _sandbox.close()


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_the_schema_allows_gets_a_5xx(case: schemathesis.Case) -> None:
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"detail"} and "reason" in body["detail"]["details"]
        assert "_internal" not in response.text and "Traceback" not in response.text
