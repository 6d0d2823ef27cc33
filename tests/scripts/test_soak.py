"""The soak script itself works: a short run against a real server passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.no_leak_check  # the server it starts is its own host


@pytest.mark.timeout(180)
def test_short_soak_serves_every_benign_call_and_no_server_error(tmp_path: Path) -> None:
    figures = tmp_path / "not-made-yet" / "soak.json"  # as make soak's .plughost/ on a clean clone
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts/soak.py"), "--minutes", "0.3", "--warmup-s", "5"]
        + ["--slow", "20", "--rss-tolerance", "1.0", "--json", str(figures)],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(figures.read_text())
    assert report["benign"]["answered"] > 0 and report["benign"]["not_answered"] == 0
    assert report["server_errors"] == []
    assert any(key.startswith("hostile 400") for key in report["statuses"])
    assert report["statuses"].get("oversized:too_large 413", 0) > 0
