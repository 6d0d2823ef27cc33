"""The library contract of SPEC sections 3, 6 and 7, as a caller uses it:
the process-wide registry, `ToolRunner()` with no arguments, and jobs
created then run."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from host.registry import PluginRegistry, get_registry
from host.services import JobManagementService, MemoryJobStore, PluginManagementService
from host.services.store import JobStatus
from sandbox.supervisor import Sandbox

pytestmark = pytest.mark.no_leak_check  # the calls run in a process of their own


def test_toolrunner_with_no_arguments_runs_the_process_registrys_plugins() -> None:
    script = textwrap.dedent(
        """
        import json
        from host.discovery import discover
        from host.registry import get_registry
        from sandbox.tool_runner import ToolRunner
        from tests.conftest import make_png

        discover(get_registry())
        payload = {"image": make_png(), "mime_type": "image/png", "options": {}}
        result, error = ToolRunner().run("image_probe", payload)
        missing = ToolRunner().run("no_such_plugin", payload)[1]["error"]["details"]["reason"]
        status = get_registry().all_status()["image_probe"]
        print(json.dumps([result["format"], error, missing, status["success_count"]]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == '["png", {}, "unknown_plugin", 1]'


def test_get_registry_is_one_registry_per_process() -> None:
    assert get_registry() is get_registry()
    assert isinstance(get_registry(), PluginRegistry)


def test_a_created_job_is_pending_until_run(
    registry: PluginRegistry, sandbox: Sandbox, payload: dict[str, object]
) -> None:
    plugins = PluginManagementService(registry, sandbox)
    jobs = JobManagementService(plugins, MemoryJobStore(), workers=1, queue_size=1)
    try:
        job = jobs.create_job("image_probe", payload)
        assert jobs.get_job(job.id).status is JobStatus.PENDING
        assert jobs.run_job(job.id).status is JobStatus.SUCCESS
    finally:
        jobs.shutdown()
