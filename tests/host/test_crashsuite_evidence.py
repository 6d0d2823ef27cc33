"""The escape cases report an escape only when what they reached is the
host's (host/crashsuite/evidence.py), and always when it is.

A host installed in a venv under /home gives each call's minimal root a
/home of its own (on the way to the venv); a host in a container's PID
namespace runs at pid 1 or 2, which the call's own PID namespace has too.
Neither may make a case cry escape, whoever runs the host; and with the
defences switched off, every case must still see the escape that happens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ensure_user

ROOT = Path(__file__).resolve().parents[2]
USER = "plughost-home"
SYSTEM_PYTHON = "/usr/bin/python3"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
# Every case that reports reaching something of the host's.
ESCAPES = (
    "connect_host_unix_socket",
    "list_host_mounts",
    "network_connect",
    "read_host_command_line",
    "read_host_cwd",
    "read_host_environ",
    "read_host_files",
    "read_other_processes",
    "read_root_only_file",
    "see_host_processes",
    "signal_host",
    "stat_host_files",
    "write_outside_scratch",
)
# Every defence a root host has against them.
DEFENCES_OFF = ("privilege_drop", "user_namespace", "landlock", "seccomp")
# Where write_outside_scratch writes when nothing stops it (its own directory aside).
ESCAPED_WRITES = (
    "/tmp/plughost-escape",
    "/var/tmp/plughost-escape",
    "/dev/shm/plughost-escape",
    "/root/plughost-escape",
    "/plughost-escape",
)
pytestmark = [
    pytest.mark.no_leak_check,  # the hosts under test are processes of their own
    pytest.mark.skipif(os.geteuid() != 0, reason="a user, /home and a PID namespace need root"),
    pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason="no system Python"),
]


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    """A venv of the system Python under /home with this checkout installed,
    readable by USER, and a working directory of USER's."""
    uid = ensure_user(USER)
    top = Path(tempfile.mkdtemp(prefix="plughost-home-", dir="/home"))
    top.chmod(0o755)
    wheels = top / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels)]
    subprocess.run([*build, str(ROOT)], check=True, timeout=300, capture_output=True)
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(top / "venv")], check=True, timeout=120)
    subprocess.run(
        [str(top / "venv/bin/pip"), "install", "--quiet", *map(str, wheels.glob("*.whl"))],
        check=True,
        timeout=600,
        capture_output=True,
    )
    work = top / "work"
    work.mkdir()
    os.chown(work, uid, -1)
    subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True, timeout=60)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def _suite(
    home: Path, *args: str, user: str | None = None, pid: int | None = None
) -> tuple[dict[str, Any], str]:
    """Run the escape cases with the installed host; its JSON report and stderr."""
    report = home / "work" / f"report-{uuid.uuid4().hex}.json"
    command = [str(home / "venv/bin/plughost"), "crash-suite", "--json", str(report), *args]
    command += [f"--case={case}" for case in ESCAPES]
    if user is not None:
        command = [RUNUSER, "-u", user, "--", *command]
    if pid is not None:
        # A PID namespace of its own, its /proc mounted, the host its pid 1
        # (exec) or pid 2 (the first child of the shell that is pid 1).
        script = {
            1: 'echo "host pid $$" >&2; exec "$@"',
            2: '"$@" & echo "host pid $!" >&2; wait $!',
        }[pid]
        command = [UNSHARE, "--pid", "--fork", "--mount-proc", "sh", "-c", script, "sh", *command]
    run = subprocess.run(
        command,
        cwd=home / "work",
        env={
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
            "LANG": "C.UTF-8",
            "PLUGHOST_UID_BASE": os.environ["PLUGHOST_UID_BASE"],
            "PLUGHOST_STATE_DIR": str(home / "work" / f"state-{user or 'root'}"),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    if pid is not None:
        assert f"host pid {pid}\n" in run.stderr, run.stderr[-2000:]
    return json.loads(report.read_text()), run.stdout[-3000:]


def _observed(report: dict[str, Any]) -> dict[str, str]:
    observed = {case["name"]: case["observed"] for case in report["cases"]}
    assert sorted(observed) == sorted(ESCAPES)
    return observed


@pytest.mark.timeout(900)
@pytest.mark.parametrize("user", [None, USER], ids=["root", "unprivileged"])
def test_escape_cases_see_no_escape_from_a_venv_under_home(home: Path, user: str | None) -> None:
    report, table = _suite(home, user=user)
    escaped = [name for name, seen in _observed(report).items() if seen == "success"]
    assert not escaped, table
    assert report["summary"]["failed"] == 0, table


@pytest.mark.timeout(900)
@pytest.mark.parametrize("pid", [1, 2])
def test_escape_cases_see_no_escape_from_a_host_at_a_small_pid(home: Path, pid: int) -> None:
    report, table = _suite(home, pid=pid)
    escaped = [name for name, seen in _observed(report).items() if seen == "success"]
    assert not escaped, table
    assert report["summary"]["passed"] == len(ESCAPES), table


@pytest.mark.timeout(900)
@pytest.mark.parametrize("pid", [None, 2], ids=["host_pid_namespace", "host_at_pid_2"])
def test_escape_cases_see_every_escape_with_the_defences_off(home: Path, pid: int | None) -> None:
    off = [f"--disable-layer={layer}" for layer in DEFENCES_OFF]
    try:
        report, table = _suite(home, *off, pid=pid)
    finally:
        for path in ESCAPED_WRITES:
            Path(path).unlink(missing_ok=True)
    missed = [name for name, seen in _observed(report).items() if seen != "success"]
    assert not missed, table
