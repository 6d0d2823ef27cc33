"""The compatibility corpus (`plugins/compat/`, `crash-suite --compat`):
ordinary plugins on multiprocessing, shared memory, thread pools, numpy,
scipy, scikit-image, OpenCV, Pillow and onnxruntime succeed in a call with
the results their manifests name. Their environments come from the package
index once and are kept in the test run's store between runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from host import crashsuite
from host.environments import EnvironmentStore, EnvStatus
from host.preparation import prepare_all
from host.registry import PluginRegistry
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner

ROOT = Path(__file__).resolve().parents[2]

# The first run downloads the corpus's wheels and installs them (uv's cache then
# holds about 480 MB, unpacked).
pytestmark = pytest.mark.timeout(900)


def _corpus_registry(
    store: EnvironmentStore, cases: list[crashsuite.compat.CompatCase]
) -> PluginRegistry:
    registry = PluginRegistry()
    registry.environments = store
    for case in cases:
        registry.register(case.name, case.plugin)
    states = prepare_all(registry)
    assert all(s.status is EnvStatus.READY for s in states.values()), states
    return registry


def test_the_compatibility_corpus_passes(
    plugin_environments: EnvironmentStore, sandbox: Sandbox
) -> None:
    cases, errors = crashsuite.load_compat()
    assert errors == []
    names = {case.name for case in cases}
    assert {
        "process_pool",
        "shared_memory",
        "thread_pool",
        "numpy_linalg",
        "scipy_ndimage",
    } <= names
    assert {"skimage_otsu", "opencv_canny", "pillow_thumbnail", "onnxruntime_model"} <= names
    registry = _corpus_registry(plugin_environments, cases)
    reports = crashsuite.run_compat(cases, ToolRunner(registry, sandbox), crashsuite.sample_png())
    print("\n" + crashsuite.format_compat(reports))
    assert [r.name for r in reports if not r.ok] == [], crashsuite.format_compat(reports)


def test_a_case_whose_result_differs_fails_and_says_how(
    plugin_environments: EnvironmentStore, sandbox: Sandbox, tmp_path: Path
) -> None:
    shutil.copytree(crashsuite.COMPAT_DIR / "thread_pool", tmp_path / "thread_pool")
    manifest = tmp_path / "thread_pool" / "plugin.toml"
    manifest.write_text(manifest.read_text().replace("threads = 15", "threads = 14"))
    cases, errors = crashsuite.load_compat(directory=tmp_path)
    assert errors == [] and len(cases) == 1
    registry = _corpus_registry(plugin_environments, cases)
    (report,) = crashsuite.run_compat(cases, ToolRunner(registry, sandbox), crashsuite.sample_png())
    assert not report.ok
    assert report.problem == "threads: expected 14, got 15"


def test_a_case_without_an_expected_result_is_a_load_error(tmp_path: Path) -> None:
    shutil.copytree(crashsuite.COMPAT_DIR / "thread_pool", tmp_path / "thread_pool")
    manifest = tmp_path / "thread_pool" / "plugin.toml"
    manifest.write_text(manifest.read_text().split("[expect]")[0])
    cases, errors = crashsuite.load_compat(directory=tmp_path)
    assert cases == []
    assert errors == [f"{manifest}: field 'expect.result' is missing"]


@pytest.mark.no_leak_check
def test_crash_suite_compat_prepares_runs_and_prints_each_cases_figures() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "host.cli", "crash-suite", "--compat"]
        + ["--case", "process_pool", "--case", "numpy_linalg"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == [
        "CASE",
        "PACKAGES",
        "VERDICT",
        "TIME",
        "PEAK",
        "MB",
        "LIMIT",
        "MB",
    ] + ["PROBLEM"]
    numpy_row = next(line for line in lines if line.startswith("numpy_linalg"))
    assert numpy_row.split()[1:3] == ["numpy", "pass"]
    assert lines[-1] == "2 of 2 compatibility cases passed"
