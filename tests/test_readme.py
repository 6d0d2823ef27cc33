"""The README's HTTP examples, run as printed (bash, curl) against a real
server: every request succeeds, and the cancel example cancels."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.host.test_serve import free_port, request, start_server, stop

pytestmark = pytest.mark.no_leak_check  # the server is its own host process
ROOT = Path(__file__).resolve().parents[1]
# curl reports each answer on stderr, apart from what the examples pipe.
REPORT = (
    "curl() { command curl -w '%{stderr}HTTP %{http_code} %{method} %{url_effective}\\n' \"$@\"; }"
)


def http_examples() -> str:
    """The first shell block of the README's section on the HTTP API."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The HTTP API") :]
    found = re.search(r"```sh\n(.*?)```", section, re.S)
    assert found, "no shell block in the README's HTTP API section"
    return found.group(1)


def wait_prepared(port: int, deadline_s: float = 600) -> None:
    """Until every plugin's environment is ready (the bundled ones need Pillow)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        plugins = request(port, "GET", "/v1/plugins")[1]["plugins"]
        pending = [p["name"] for p in plugins if p["environment"]["status"] == "preparing"]
        if not pending:
            return
        time.sleep(0.5)
    raise AssertionError(f"environments still preparing: {pending}")


@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("curl") is None, reason="the examples are curl commands")
def test_the_readmes_http_examples_succeed_as_printed(tmp_path: Path) -> None:
    examples = http_examples()
    port = free_port()
    server = start_server(tmp_path / "jobs.sqlite3", port)
    try:
        wait_prepared(port)
        script = "set -euo pipefail\n" + REPORT + "\n" + examples
        script = script.replace("localhost:8000", f"127.0.0.1:{port}")
        done = subprocess.run(
            ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        answers = [
            line.split(" ", 3)[1:] for line in done.stderr.splitlines() if line.startswith("HTTP ")
        ]
        # Every curl of the block answered, each with a success.
        # (a curl that xargs starts is the binary, past the reporting function)
        assert len(answers) >= examples.count("curl -s") - examples.count("xargs")
        failed = [answer for answer in answers if not answer[0].startswith("2")]
        assert not failed, (failed, done.stdout[-3000:])
        cancels = [(code, url) for code, method, url in answers if method == "DELETE"]
        assert len(cancels) == 1 and cancels[0][0] == "200", cancels
        job_id = cancels[0][1].rsplit("/", 1)[1]
        assert request(port, "GET", f"/v1/jobs/{job_id}")[1]["status"] == "CANCELLED"
    finally:
        stop(server)
