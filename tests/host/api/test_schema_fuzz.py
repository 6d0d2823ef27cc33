"""Fuzzing driven by the API's own OpenAPI schema (schemathesis): whatever
the schema lets a client send, and whatever it mutates around that, the
server never answers with a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from host.api import Services, create_app
from host.config import Settings
from host.discovery import discover
from host.registry import PluginRegistry
from host.services import (
    AnalysisService,
    JobManagementService,
    MemoryJobStore,
    PluginManagementService,
)
from sandbox.supervisor import Sandbox

_registry = PluginRegistry()
discover(_registry)
_sandbox = Sandbox()  # the schema needs the app at import; closed after the module
_plugins = PluginManagementService(_registry, _sandbox)
_jobs = JobManagementService(_plugins, MemoryJobStore(), workers=2, queue_size=512)
APP = create_app(
    Settings(self_check=False, admin_token="admin-token"),
    Services(_plugins, _jobs, AnalysisService(_jobs)),
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


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
