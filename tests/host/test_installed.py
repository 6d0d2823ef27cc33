"""plughost as users get it: a wheel built from this tree, installed into a
fresh venv of the system Python outside the repository, run from a directory
that is not a checkout; by root, and by a dedicated unprivileged user (an
operator's service account). Every case whose layers are present passes, and
an unprivileged host's calls get the namespaces, Landlock and seccomp from a
user namespace of their own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import HOSTILE_DIR, ensure_user

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "plughost-edge-count"
USER = "plughost-ci"
SYSTEM_PYTHON = "/usr/bin/python3"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
UID_BASE = os.environ["PLUGHOST_UID_BASE"]
pytestmark = [
    pytest.mark.no_leak_check,  # the hosts under test are processes of their own
    pytest.mark.skipif(os.geteuid() != 0, reason="creating a user and running as it needs root"),
]


@pytest.fixture(scope="module")
def install() -> Iterator[Path]:
    """A venv of the system Python with the wheel installed, readable by USER
    (a checkout under /root and the interpreter of a root-only pyenv are
    not), and a working directory of USER's with nothing of the source."""
    uid = ensure_user(USER)
    top = Path(tempfile.mkdtemp(prefix="plughost-installed-", dir="/var/tmp"))
    top.chmod(0o755)
    wheels = top / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels)]
    subprocess.run([*build, str(ROOT)], check=True, timeout=300, capture_output=True)
    # A third-party plugin shipped as a distribution (the plughost.plugins entry points).
    subprocess.run([*build, str(EXAMPLE)], check=True, timeout=300, capture_output=True)
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


def _plughost(
    install: Path, *args: str, user: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    command = [str(install / "venv/bin/plughost"), *args]
    if user is not None:
        command = [RUNUSER, "-u", user, "--", *command]
    # Each user's plugin environments in a state directory of its own: a
    # service account has no home, and the test run's store is root's.
    state = install / "work" / f"state-{user or 'root'}"
    return subprocess.run(
        command,
        cwd=install / "work",
        # The test run's own uid range (tests/conftest.py), not a server's.
        env={
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PLUGHOST_UID_BASE": UID_BASE,
            "PLUGHOST_STATE_DIR": str(state),
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _sample(install: Path) -> str:
    found = list((install / "venv/lib").glob("python3*/site-packages/plughost_plugins/samples"))
    assert found, "the wheel carries no sample images"
    return str(found[0] / "sunset.png")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("user", [None, USER], ids=["root", "unprivileged"])
def test_installed_host_lists_and_runs_the_bundled_plugins(install: Path, user: str | None) -> None:
    listed = _plughost(install, "plugins", "--json", user=user)
    assert listed.returncode == 0, listed.stderr[-2000:]
    names = {p["name"] for p in json.loads(listed.stdout)["plugins"]}
    assert {"image_info", "image_hash", "dominant_colors"} <= names
    run = _plughost(install, "run", "image_info", "--image", _sample(install), user=user)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert json.loads(run.stdout)["result"]["width"] == 320
    assert "image_info: environment ready" in run.stderr  # Pillow, prepared before the call


@pytest.mark.timeout(900)
@pytest.mark.parametrize("user", [None, USER], ids=["root", "unprivileged"])
def test_a_plugin_distribution_installs_and_runs_from_its_wheel(
    install: Path, user: str | None
) -> None:
    listed = _plughost(install, "plugins", "--json", user=user)
    assert listed.returncode == 0, listed.stderr[-2000:]
    [edge] = [p for p in json.loads(listed.stdout)["plugins"] if p["name"] == "edge_count"]
    site = next((install / "venv/lib").glob("python3*/site-packages"))
    assert edge["directory"] == str(site / "edge_count")  # its own package, not site-packages
    run = _plughost(
        install,
        "run",
        "edge_count",
        "--image",
        _sample(install),
        "--option",
        "threshold=32",
        user=user,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(run.stdout)["result"]
    assert result["width"] == 320 and result["threshold"] == 32 and result["edge_pixels"] > 0
    refused = _plughost(
        install,
        "run",
        "edge_count",
        "--image",
        _sample(install),
        "--option",
        "threshold=0",
        user=user,
    )
    assert refused.returncode == 1
    assert "options.threshold" in json.loads(refused.stdout)["error"]["message"]


UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "mounts",
    [
        # As systemd mounts it. Seen from a user namespace those flags are
        # locked, and a bind remount of /sys/devices/system/cpu that drops one
        # is EPERM: every call of the unprivileged host failed at set-up.
        "mount -o remount,bind,nosuid,nodev,noexec /sys",
        # As a service with ProtectSystem=strict sees it, on a machine where no
        # root host ever made /run/plughost: the host died making its lock there.
        "mount -t tmpfs -o ro,mode=0755 tmpfs /run",
    ],
    ids=["sys-nosuid-nodev-noexec", "run-read-only"],
)
def test_unprivileged_host_runs_calls_on_systemds_mounts(install: Path, mounts: str) -> None:
    inner = [RUNUSER, "-u", USER, "--", str(install / "venv/bin/plughost")]
    script = f'{mounts} && exec "$@"'
    command = [UNSHARE, "--mount", "--propagation", "private", "sh", "-c", script, "sh", *inner]
    run = subprocess.run(
        [*command, "run", "image_probe", "--image", _sample(install)],
        cwd=install / "work",
        env={
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PLUGHOST_UID_BASE": UID_BASE,
            "PLUGHOST_STATE_DIR": str(install / "work" / "state-locked-sys"),
        },
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert json.loads(run.stdout)["result"]["format"] == "png"


@pytest.mark.timeout(900)
def test_installed_root_host_passes_the_whole_crash_suite(install: Path) -> None:
    report_path = install / "work" / "root-suite.json"
    run = _plughost(install, "crash-suite", "--json", str(report_path), timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    report = json.loads(report_path.read_text())
    # Every case of the checkout, each one passed: the wheel carries them all.
    corpus = {path.parent.name for path in HOSTILE_DIR.glob("*/plugin.toml")}
    assert {case["name"] for case in report["cases"]} == corpus
    assert report["summary"]["passed"] == len(corpus)


@pytest.mark.timeout(900)
def test_unprivileged_host_passes_the_crash_suite_with_namespaces_landlock_and_seccomp(
    install: Path,
) -> None:
    report_path = install / "work" / "suite.json"
    run = _plughost(install, "crash-suite", "--json", str(report_path), user=USER, timeout=600)
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


@pytest.mark.timeout(900)
def test_installed_wheel_carries_the_console_templates_and_assets(install: Path) -> None:
    # Rendering the overview template proves the loader finds the package's files.
    script = (
        "from importlib import resources\n"
        "from host.api.console import _environment, _static_files\n"
        "assets = _static_files()\n"
        "assert {'console.css', 'console.js'} <= set(assets), assets\n"
        "templates = resources.files('host.console').joinpath('templates')\n"
        "names = [entry.name for entry in templates.iterdir()]\n"
        "assert 'overview.html' in names, names\n"
        "_environment().get_template('isolation.html')\n"
        "print('ok')\n"
    )
    run = subprocess.run(
        [str(install / "venv/bin/python"), "-c", script],
        cwd=install / "work",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_installed_wheel_carries_the_deploy_files(install: Path) -> None:
    venv = install / "venv"
    unit = _plughost(install, "deploy", "systemd", "--user", "svc")
    assert unit.returncode == 0, unit.stderr
    assert f"ExecStart={venv}/bin/plughost serve --state-dir" in unit.stdout
    assert "\nUser=svc\n" in unit.stdout and "Delegate=yes" in unit.stdout
    security = _plughost(install, "deploy", "security")
    assert security.stdout == (ROOT / "SECURITY.md").read_text()
    dashboard = _plughost(install, "deploy", "grafana")
    assert json.loads(dashboard.stdout)["panels"]
    listed = _plughost(install, "deploy")
    paths = [line.split(None, 1)[1] for line in listed.stdout.splitlines()[:4]]
    # The installed package's files, not the checkout's.
    assert all(Path(p).is_file() and str(venv) in p for p in paths), listed.stdout
