"""The phase breakdown works: every set-up step of the child, the launcher's
fork and the host's own phases are measured on real calls (time and page
faults), and the CPU rows add up to the call's total."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.child import STEPS

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.no_leak_check  # the sandbox it makes is its own host


@pytest.mark.timeout(120)
@pytest.mark.parametrize("prewarm", [0, 1])
def test_phases_measures_every_step_of_a_call(prewarm: int) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts/phases.py"), "--calls", "4", "--rounds", "2"]
        + ["--prewarm", str(prewarm)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    rounds = [line.split() for line in lines if line.split()[:1] in (["1"], ["2"])]
    assert len(rounds) == 2 and all(float(r[1]) > 0 for r in rounds), run.stdout
    if prewarm:
        return
    rows = {line.split()[0]: line.split()[1:] for line in lines if line}
    for name, _ in STEPS:
        assert f"child.{name}" in rows, name
    for label in ("host.cgroup_take", "launcher.fork+pid", "child.import", "exit.teardown+reap"):
        assert label in rows, label
    total = [line for line in lines if line.startswith("CPU: total per call")]
    assert total and float(total[0].split()[-2]) > 0
    # Minor faults per phase: a forked child's first step writes pages it
    # shares with the launcher, and the call tree's rusage counts them.
    assert int(rows["child.forked"][2]) > 0, rows["child.forked"]
    faults = [line.split() for line in lines if line.startswith("CPU: call tree")]
    assert faults and int(faults[0][-2]) >= int(rows["child.forked"][2]), faults
