"""A crashing plugin never makes any process of the host write a core dump,
whatever core limit the service manager gave the host."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HOSTILE_DIR

# Runs in a fresh host process whose working directory is the test's: the
# core limit raised as `LimitCORE=infinity` would, then the crashing cases.
HOST = """
import json, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
from host.discovery import discover
from host.registry import PluginRegistry
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner
registry = PluginRegistry()
discover(registry, [sys.argv[1]])
runner = ToolRunner(registry, Sandbox())
seen = {}
for case in ("segfault", "abort"):
    result, error = runner.run(case, {"image": b"x", "mime_type": "image/png", "options": {}})
    seen[case] = error["error"]["details"]
runner.sandbox.close()
print(json.dumps(seen))
"""


@pytest.mark.skipif(
    resource.getrlimit(resource.RLIMIT_CORE)[1] == 0, reason="the core limit is 0 here"
)
@pytest.mark.skipif(os.geteuid() != 0, reason="the relay of a PID namespace needs a root host")
def test_crashing_plugin_leaves_no_core_file_in_the_host_directory(tmp_path: Path) -> None:
    source = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, "-c", HOST, str(HOSTILE_DIR)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": source},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # The plugin's fatal signal is still what the host reports...
    assert seen["segfault"]["signal"] == "SIGSEGV"
    assert seen["abort"]["signal"] == "SIGABRT"
    # ...but no process of the call re-raised it and dumped core as root.
    assert sorted(p.name for p in tmp_path.iterdir()) == []
