"""An unprivileged host, as an operator runs it: a dedicated user, a venv made
from the system Python that this user can read, and the crash suite run as
that user. Every case whose layers are present passes, and the calls get
the namespaces, Landlock and seccomp from a user namespace of their own."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
USER = "plughost-ci"
SYSTEM_PYTHON = "/usr/bin/python3"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
pytestmark = [
    pytest.mark.no_leak_check,  # the host under test is another user's process
    pytest.mark.skipif(os.geteuid() != 0, reason="creating a user and running as it needs root"),
]


def _ensure_user() -> int:
    try:
        return pwd.getpwnam(USER).pw_uid
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            check=True,
            timeout=30,
        )
        return pwd.getpwnam(USER).pw_uid


@pytest.fixture(scope="module")
def install() -> Iterator[Path]:
    """A copy of the source and a venv of the system Python, readable by USER
    (a checkout under /root and the interpreter of a root-only pyenv are not)."""
    uid = _ensure_user()
    top = Path(tempfile.mkdtemp(prefix="plughost-unprivileged-", dir="/var/tmp"))
    top.chmod(0o755)
    source = top / "src"
    source.mkdir()
    for name in ("host", "sandbox", "plugins"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(top / "venv")], check=True, timeout=120)
    subprocess.run(
        [str(top / "venv/bin/pip"), "install", "--quiet", str(source)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    reports = top / "reports"
    reports.mkdir()
    os.chown(reports, uid, -1)
    subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True, timeout=60)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def _as_user(install: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run(
        [RUNUSER, "-u", USER, "--", str(install / "venv/bin/python"), "-m", "host.cli", *args],
        cwd=install / "src",
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(900)
def test_unprivileged_host_passes_the_crash_suite_with_namespaces_landlock_and_seccomp(
    install: Path,
) -> None:
    report_path = install / "reports" / "suite.json"
    run = _as_user(install, "crash-suite", "--json", str(report_path), timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    report = json.loads(report_path.read_text())
    protections = report["protections"]
    for layer in (
        "user_namespace",
        "mount_namespace",
        "tmpfs_scratch",
        "network_namespace",
        "pid_namespace",
        "ipc_namespace",
        "uts_namespace",
        "landlock",
        "seccomp",
        "no_new_privs",
    ):
        assert protections[layer] is True, layer
    # What needs root stays off, and says so.
    assert protections["privilege_drop"] is False
    verdicts = {case["name"]: case["verdict"] for case in report["cases"]}
    assert "FAIL" not in verdicts.values()
    # Only cases whose defence needs a root-only layer may go undefended.
    undefended = [name for name, verdict in verdicts.items() if verdict != "pass"]
    assert len(undefended) <= 3, undefended


@pytest.mark.timeout(300)
def test_unprivileged_host_runs_a_bundled_plugin(install: Path) -> None:
    run = _as_user(
        install, "run", "image_info", "--image", "plugins/samples/sunset.png", timeout=120
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert json.loads(run.stdout)["result"]["width"] == 320
