"""`plughost serve` as a real process: it serves on a free localhost port, and
a SIGKILL under load loses no accepted job."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from sandbox.supervisor import uid_range
from tests.conftest import HOSTILE_DIR, make_png, write_plugin

pytestmark = pytest.mark.no_leak_check  # the server is its own host process
ROOT = Path(__file__).resolve().parents[2]
BODY = {"image": base64.b64encode(make_png()).decode(), "mime_type": "image/png"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(
    port: int, method: str, path: str, body: dict | None = None, timeout_s: float = 30
) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def start_server(db: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    log = db.with_suffix(f".{port}.log")
    with log.open("wb") as stream:  # a file, not a pipe: a full pipe would block the server
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "host.cli",
                "serve",
                "--port",
                str(port),
                "--db",
                str(db),
                "--plugins-dir",
                str(HOSTILE_DIR),
                "--workers",
                "2",
                *extra,
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stream,
        )
    server.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if request(port, "GET", "/healthz")[0] == 200:
                return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    server.wait(10)
    raise AssertionError(f"server did not start: {log.read_text()[-2000:]}")


def stop(server: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if server.poll() is None:
        os.kill(server.pid, sig)
    server.wait(20)


def test_real_server_answers_on_localhost(tmp_path: Path) -> None:
    port = free_port()
    broken = tmp_path / "more" / "broken"
    broken.mkdir(parents=True)
    (broken / "plugin.toml").write_text('name = "broken"\nversion = "1"\n')  # no entrypoint
    server = start_server(tmp_path / "jobs.sqlite3", port, "--plugins-dir", str(broken.parent))
    try:
        status, data = request(port, "POST", "/v1/analyze", {**BODY, "plugin": "image_info"})
        assert status == 200 and data["result"]["format"] == "PNG"
        status, data = request(port, "POST", "/v1/analyze", {**BODY, "plugin": "segfault"})
        assert status == 400 and data["detail"]["details"]["signal"] == "SIGSEGV"
        status, data = request(port, "GET", "/readyz")
        assert status == 200 and data["isolation"]["privilege_drop"] == (os.geteuid() == 0)
    finally:
        stop(server)
    # uvicorn shuts down gracefully, then exits with the signal it caught.
    assert server.returncode in (0, -signal.SIGTERM)
    logs = server.log.read_text().splitlines()
    assert any("Application shutdown complete" in line for line in logs)
    # Start-up says which isolation the calls get and how the self-check went.
    assert any("layers active:" in line and "seccomp" in line for line in logs)
    assert any("self-check passed" in line or "self-check failed" in line for line in logs)
    job_lines = [json.loads(line) for line in logs if '"job finished"' in line]
    assert job_lines and all("job_id" in line and "plugin" in line for line in job_lines)
    # It says where it serves, and which plugin directory it did not load and why.
    assert any(f"serving on http://127.0.0.1:{port} (console" in line for line in logs)
    not_loaded = [json.loads(line)["message"] for line in logs if "plugin not loaded" in line]
    assert len(not_loaded) == 1 and str(broken) in not_loaded[0]
    assert "entrypoint" in not_loaded[0]


def test_a_port_in_use_is_refused_at_once_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "host.cli", "serve", "--port", str(port)]
            + ["--db", str(tmp_path / "jobs.sqlite3")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1
    # One line, before any of the start-up (no layers, no self-check logged).
    assert done.stderr.splitlines() == [
        f"plughost: cannot listen on 127.0.0.1:{port}: the address is already in use"
        " (another server listens there); choose another port with --port N or PLUGHOST_PORT=N"
    ]


def test_sigkill_under_load_loses_no_accepted_job(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    port = free_port()
    server = start_server(db, port)
    accepted: list[str] = []
    try:
        for i in range(12):
            plugin = ["sleep_forever", "image_info", "busy_loop"][i % 3]
            status, data = request(port, "POST", "/v1/jobs", {**BODY, "plugin": plugin})
            if status == 202:
                accepted.append(data["job"]["id"])
        time.sleep(0.3)  # some are running, some queued, some done
    finally:
        stop(server, signal.SIGKILL)
    assert len(accepted) >= 10
    port = free_port()
    server = start_server(db, port)
    try:
        finished = {"SUCCESS", "FAILED", "CANCELLED", "INTERRUPTED"}
        for job_id in accepted:
            status, job = request(port, "GET", f"/v1/jobs/{job_id}")
            assert status == 200, job
            assert job["status"] in finished
            if job["status"] == "INTERRUPTED":
                assert job["error"]["details"]["reason"] == "interrupted"
                assert "stopped" in job["error"]["message"]
        status, listing = request(port, "GET", "/v1/jobs?limit=100")
        assert listing["total"] == len(accepted)
        assert any(j["status"] == "INTERRUPTED" for j in listing["jobs"])
    finally:
        stop(server)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving up root needs a server started as root")
def test_root_server_serves_as_its_user_while_calls_keep_their_own_uids(tmp_path: Path) -> None:
    from tests.conftest import ensure_user
    from tests.host.test_installed import USER

    user_uid = ensure_user(USER)
    state = Path(tempfile.mkdtemp(prefix="plughost-user-", dir="/var/tmp"))
    state.chmod(0o755)  # the user must reach its state directory
    (state / "db").mkdir()
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "whoami", "return {'uid': os.getuid()}")
    port = free_port()
    server = start_server(
        state / "db" / "jobs.sqlite3", port, "--user", USER, "--plugins-dir", str(plugins)
    )
    try:
        assert psutil.Process(server.pid).uids().real == user_uid  # the HTTP side
        status, data = request(port, "POST", "/v1/analyze", {**BODY, "plugin": "whoami"})
        assert status == 200
        call_uid = data["result"]["uid"]
        assert call_uid != user_uid and call_uid in uid_range()
        status, data = request(port, "POST", "/v1/analyze", {**BODY, "plugin": "segfault"})
        assert status == 400 and data["detail"]["details"]["signal"] == "SIGSEGV"
        status, data = request(port, "GET", "/readyz")
        assert data["isolation"]["privilege_drop"] is True
        assert (state / "db" / "jobs.sqlite3").stat().st_uid == user_uid
        stop(server)
        assert any("serving as user" in line for line in server.log.read_text().splitlines())
    finally:
        stop(server)
        shutil.rmtree(state, ignore_errors=True)


def _launchers(server: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The server's sandbox launchers (its direct children; warm children
    forked by a launcher share its command line, one level further down)."""
    return [
        proc
        for proc in psutil.Process(server.pid).children()
        if "sandbox.launcher" in " ".join(proc.cmdline())
    ]


def test_self_check_runs_on_the_sandbox_that_serves(tmp_path: Path) -> None:
    from sandbox.layers import detect

    layer = next(
        (name for name in ("seccomp", "landlock", "network_namespace") if detect().get(name)),
        None,
    )
    if layer is None:
        pytest.skip("this machine has none of the layers the test switches off")
    port = free_port()
    server = start_server(tmp_path / "jobs.sqlite3", port, "--disable-layer", layer)
    try:
        status, ready = request(port, "GET", "/readyz")
        assert status == 200 and ready["isolation"][layer] is False
        # The probes ran where the calls run: without the layer, on one launcher.
        assert ready["self_check"]["cases"] > 0 and ready["self_check"]["failed_cases"] == []
        assert layer in ready["self_check"]["missing_layers"]
        assert len(_launchers(server)) == 1
        status, _ = request(port, "POST", "/v1/analyze", {**BODY, "plugin": "image_info"})
        assert status == 200 and len(_launchers(server)) == 1
    finally:
        stop(server)


def test_sigterm_answers_the_queued_analyses_at_once_and_lets_the_running_one_finish(
    tmp_path: Path,
) -> None:
    # The queued analyses never ran: their clients hear so in an envelope
    # they can retry on, as the server begins to stop (they waited for the
    # running jobs, then ran or got a bare 500 when uvicorn's graceful
    # period ran out). The running analysis answers its result.
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "slow", "time.sleep(2)\nreturn {'slept': 2}")
    port = free_port()
    server = start_server(
        tmp_path / "jobs.sqlite3", port, "--plugins-dir", str(plugins), "--workers", "1"
    )
    answers: dict[str, tuple[int, dict]] = {}

    def analyze(name: str) -> None:
        answers[name] = request(port, "POST", "/v1/analyze", {**BODY, "plugin": "slow"})

    threads = {}
    try:
        for name in ("running", "queued 1", "queued 2"):
            threads[name] = threading.Thread(target=analyze, args=(name,))
            threads[name].start()
            time.sleep(0.5)  # the first runs; the others queue behind it
        signalled = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        for name in ("queued 1", "queued 2"):
            threads[name].join(20)
            status, data = answers[name]
            assert status == 503 and data["detail"]["details"]["reason"] == "shutting_down", data
            assert "did not run" in data["detail"]["message"]
        assert time.monotonic() - signalled < 1.5  # at once, not after the running call
        threads["running"].join(20)
        assert answers["running"] == (200, answers["running"][1])
        assert answers["running"][1]["result"] == {"slept": 2}
    finally:
        stop(server)
    assert server.returncode in (0, -signal.SIGTERM)
    assert "Cancel" not in server.log.read_text()  # nothing was left to uvicorn to cancel


@pytest.mark.timeout(90)
def test_an_analysis_running_past_the_graceful_period_is_answered_with_its_job(
    tmp_path: Path,
) -> None:
    # README: no traceback and no bare 500 leaves the host; SIGTERM finishes
    # running jobs and marks the rest INTERRUPTED. An analysis still running
    # near the end of uvicorn's graceful period answers 202 with its job
    # (uvicorn cancelled it with a bare 'Internal Server Error' in text/plain,
    # and its job, run on and stored SUCCESS, had an id its client never
    # heard of).
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "slow", "time.sleep(13)\nreturn {'slept': 13}", timeout_s=30)
    port = free_port()
    server = start_server(
        tmp_path / "jobs.sqlite3", port, "--plugins-dir", str(plugins), "--workers", "1"
    )
    answer: list[tuple[int, str, bytes]] = []

    def analyze() -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/analyze",
            data=json.dumps({**BODY, "plugin": "slow"}).encode(),
            method="POST",
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=25) as response:
                answer.append((response.status, response.headers["content-type"], response.read()))
        except urllib.error.HTTPError as exc:
            answer.append((exc.code, exc.headers["content-type"], exc.read()))

    thread = threading.Thread(target=analyze)
    try:
        thread.start()
        time.sleep(1)  # it runs
        os.kill(server.pid, signal.SIGTERM)
        thread.join(25)
    finally:
        stop(server)
    status, content_type, data = answer[0]
    assert content_type == "application/json", (status, data)
    assert status == 202, (status, data)  # its job to follow, answered before uvicorn gave up
    job_id = json.loads(data)["job"]["id"]
    # The job ran on through the job service's own shutdown, and is kept.
    server = start_server(tmp_path / "jobs.sqlite3", port, "--plugins-dir", str(plugins))
    try:
        status, job = request(port, "GET", f"/v1/jobs/{job_id}")
    finally:
        stop(server)
    assert status == 200 and job["status"] == "SUCCESS" and job["result"] == {"slept": 13}, job
