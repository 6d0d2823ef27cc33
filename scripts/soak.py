"""Soak test: a real `plughost serve` under mixed traffic for a long time.

    benign clients   --- /v1/analyze and /v1/jobs with the bundled plugins ---+
    hostile clients  --- the crash-suite plugins through /v1/analyze ---------+--> plughost serve
    oversized client --- bodies over the limit, options nested too deep -----+    (127.0.0.1 only)
    slow client      --- connections that never finish their headers --------+
    sampler          --- the server's RSS every few seconds

Passes (exit 0) when, over the whole run: no response was a 500, 502 or 504
(503 with Retry-After is the designed answer of a quarantined plugin or a
full queue, and is counted apart), every benign call was answered with its
result (a benign call that gets 503 honours Retry-After and tries again),
and the server's RSS at the end is within 10% of its RSS after the warm-up.
Prints the figures; `--json FILE` writes them too.

    python scripts/soak.py                  # 30 minutes (make soak)
    python scripts/soak.py --minutes 2      # a short run
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "plugins" / "samples" / "sunset.png"
BENIGN = ("image_info", "image_hash", "dominant_colors")
# Crash-suite cases that need nothing from the suite's harness.
HOSTILE = (
    "busy_loop",
    "huge_allocation",
    "fork_bomb",
    "segfault",
    "abort",
    "stdout_flood",
    "garbage_frame",
    "forged_length",
    "daemon_grandchild",
    "memory_in_threads",
    "result_too_large",
    "raise_kaboom",
    "return_nan",
    "deep_nesting",
    "read_root_only_file",
    "write_outside_scratch",
    "disk_fill",
    "slow_growth",
)
RSS_TOLERANCE = 0.10
REQUEST_TIMEOUT_S = 60.0


@dataclass
class Tally:
    """What the clients saw; shared between threads under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter[str] = field(default_factory=Counter)
    benign_ok: int = 0
    benign_failed: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    benign_ms: list[float] = field(default_factory=list)
    slow_opened: int = 0
    slow_closed_by_server: int = 0

    def saw(self, kind: str, status: int, detail: str = "") -> None:
        with self.lock:
            self.statuses[f"{kind} {status}"] += 1
            if status in (500, 502, 504) or status < 0:
                self.server_errors.append(f"{kind} {status} {detail}"[:300])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(
    port: int, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One request on a fresh connection: (status, JSON body or {}, headers)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request(method, path, body=body, headers={"content-type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        try:
            document = json.loads(data) if data else {}
        except ValueError:
            document = {"raw": data[:200].decode(errors="replace")}
        return response.status, document, dict(response.getheaders())
    except (OSError, http.client.HTTPException) as exc:
        return -1, {"exception": repr(exc)}, {}
    finally:
        connection.close()


def analyze_body(plugin: str, image: str, options: dict[str, Any] | None = None) -> bytes:
    return json.dumps(
        {"plugin": plugin, "image": image, "mime_type": "image/png", "options": options or {}}
    ).encode()


def benign_client(port: int, image: str, tally: Tally, stop: threading.Event) -> None:
    rng = random.Random()
    while not stop.is_set():
        plugin = rng.choice(BENIGN)
        use_jobs = rng.random() < 0.3
        started = time.monotonic()
        for _attempt in range(20):  # a 503 says when to come back
            if use_jobs:
                status, document, headers = call(
                    port, "POST", "/v1/jobs", analyze_body(plugin, image)
                )
                if status == 202:
                    status, document = _poll_job(port, document["job"]["id"])
            else:
                status, document, headers = call(
                    port, "POST", "/v1/analyze", analyze_body(plugin, image)
                )
            tally.saw("benign", status, json.dumps(document)[:200])
            if status != 503:
                break
            stop.wait(min(float(headers.get("retry-after", "1")), 5.0))
        with tally.lock:
            if status == 200 and document.get("result"):
                tally.benign_ok += 1
                tally.benign_ms.append((time.monotonic() - started) * 1000)
            else:
                tally.benign_failed.append(f"{plugin}: {status} {json.dumps(document)[:200]}")


def _poll_job(port: int, job_id: str) -> tuple[int, dict[str, Any]]:
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while time.monotonic() < deadline:
        status, document, _ = call(port, "GET", f"/v1/jobs/{job_id}")
        if status != 200 or document.get("status") not in ("PENDING", "RUNNING"):
            return status, document
        time.sleep(0.05)
    return -1, {"timeout": f"job {job_id} did not finish"}


def hostile_client(port: int, image: str, tally: Tally, stop: threading.Event) -> None:
    rng = random.Random()
    while not stop.is_set():
        plugin = rng.choice(HOSTILE)
        status, document, _ = call(port, "POST", "/v1/analyze", analyze_body(plugin, image))
        tally.saw("hostile", status, f"{plugin} {json.dumps(document)[:200]}")
        if status == 503:
            stop.wait(0.5)


def oversized_client(port: int, limit: int, tally: Tally, stop: threading.Event) -> None:
    too_large = b'{"image": "' + b"A" * (limit + 1024) + b'", "mime_type": "image/png"}'
    deep = b'{"plugin": "image_info", "image": "AAAA", "mime_type": "image/png", "options": '
    deep += b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    bodies = [
        ("too_large", too_large),
        ("deep_options", deep),
        ("many_items", analyze_body("image_info", "AAAA", {"x": [{}] * 200_000})),
    ]
    while not stop.is_set():
        for kind, body in bodies:
            status, document, _ = call(port, "POST", "/v1/analyze", body)
            tally.saw(f"oversized:{kind}", status, json.dumps(document)[:200])
        stop.wait(1.0)


def slow_client(port: int, connections: int, tally: Tally, stop: threading.Event) -> None:
    """Holds connections that send half a request line and then nothing."""
    while not stop.is_set():
        held = []
        for _ in range(connections):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"POST /v1/analyze HTTP/1.1\r\nHost: x\r\n")
                held.append(sock)
            except OSError:
                break
        with tally.lock:
            tally.slow_opened += len(held)
        stop.wait(20.0)
        for sock in held:
            sock.setblocking(False)
            try:
                closed = sock.recv(1) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            with tally.lock:
                tally.slow_closed_by_server += closed
            sock.close()


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--benign", type=int, default=4, help="benign clients")
    parser.add_argument("--hostile", type=int, default=2, help="hostile clients")
    parser.add_argument("--slow", type=int, default=200, help="slow connections held at once")
    parser.add_argument("--max-request-bytes", type=int, default=4 * 2**20)
    parser.add_argument(
        "--rss-tolerance", type=float, default=RSS_TOLERANCE, help="allowed RSS growth, 0.1 = 10%%"
    )
    parser.add_argument("--json", help="write the figures to this file")
    return parser.parse_args(argv)


def _start_server(port: int, state: Path, max_request_bytes: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PLUGHOST_MAX_REQUEST_BYTES": str(max_request_bytes)}
    with (state / "server.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "host.cli", "serve", "--port", str(port)]
            + ["--state-dir", str(state), "--plugins-dir", str(ROOT / "plugins/hostile")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=state,
        )


def _wait_ready(server: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    """Until the server answers and the benign plugins' environments are
    prepared (a server prepares them in the background after it starts)."""
    deadline = time.monotonic() + 300
    pending = list(BENIGN)
    while pending:
        if server.poll() is not None or time.monotonic() > deadline:
            print(log_path.read_text()[-3000:], file=sys.stderr)
            raise SystemExit("the server did not start, or its plugins' environments failed")
        status, body, _ = call(port, "GET", f"/v1/plugins/{pending[0]}")
        if status == 200 and body["environment"]["status"] in ("ready", "none"):
            pending.pop(0)
            continue
        time.sleep(0.5)


def _clients(port: int, image: str, args: argparse.Namespace, tally: Tally, stop: Any) -> list[Any]:
    return [
        *(
            threading.Thread(target=benign_client, args=(port, image, tally, stop))
            for _ in range(args.benign)
        ),
        *(
            threading.Thread(target=hostile_client, args=(port, image, tally, stop))
            for _ in range(args.hostile)
        ),
        threading.Thread(target=oversized_client, args=(port, args.max_request_bytes, tally, stop)),
        threading.Thread(target=slow_client, args=(port, args.slow, tally, stop)),
    ]


def _sample_rss(
    server: subprocess.Popen[bytes], args: argparse.Namespace, samples: list[tuple[float, float]]
) -> float | None:
    """Sample the server's RSS every 5 s for the run; return the one after the warm-up."""
    started = time.monotonic()
    end = started + args.minutes * 60
    rss_start: float | None = None
    while time.monotonic() < end and server.poll() is None:
        now = time.monotonic() - started
        samples.append((round(now, 1), round(rss_mb(server.pid), 1)))
        if rss_start is None and now >= min(args.warmup_s, args.minutes * 30):
            rss_start = samples[-1][1]
        time.sleep(min(5.0, max(0.0, end - time.monotonic())))
    return rss_start


def _stop_server(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(30)
    if server.poll() is None:
        server.kill()
        server.wait(10)


def _figures(
    args: argparse.Namespace, tally: Tally, rss: tuple[float, float], alive: bool, log_path: Path
) -> dict[str, Any]:
    return {
        "minutes": args.minutes,
        "server_alive_at_end": alive,
        "rss_mb": {"after_warmup": rss[0], "end": round(rss[1], 1)},
        "benign": {
            "answered": tally.benign_ok,
            "not_answered": len(tally.benign_failed),
            "p50_ms": round(statistics.median(tally.benign_ms), 1) if tally.benign_ms else None,
            "p95_ms": round(statistics.quantiles(tally.benign_ms, n=20)[18], 1)
            if len(tally.benign_ms) >= 20
            else None,
        },
        "statuses": dict(sorted(tally.statuses.items())),
        "server_errors": tally.server_errors[:20],
        "slow_connections": {
            "opened": tally.slow_opened,
            "closed_by_server": tally.slow_closed_by_server,
        },
        "log_bytes": log_path.stat().st_size,
        "benign_failures": tally.benign_failed[:20],
    }


def _problems(tally: Tally, rss: tuple[float, float], alive: bool, tolerance: float) -> list[str]:
    problems = []
    if not alive:
        problems.append("the server died")
    if tally.server_errors:
        problems.append(f"{len(tally.server_errors)} responses were 500/502/504 or no answer")
    if tally.benign_failed or not tally.benign_ok:
        problems.append(f"{len(tally.benign_failed)} benign calls not answered")
    if not rss[1] <= rss[0] * (1 + tolerance):
        problems.append(f"server RSS went from {rss[0]} MB to {rss[1]:.1f} MB")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    image = base64.b64encode(SAMPLE.read_bytes()).decode()
    port = free_port()
    state = Path(tempfile.mkdtemp(prefix="plughost-soak-"))
    log_path = state / "server.log"
    server = _start_server(port, state, args.max_request_bytes)
    tally, stop = Tally(), threading.Event()
    samples: list[tuple[float, float]] = []
    try:
        _wait_ready(server, port, log_path)
        threads = _clients(port, image, args, tally, stop)
        for thread in threads:
            thread.start()
        rss_start = _sample_rss(server, args, samples)
        stop.set()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT_S + 30)
        alive = server.poll() is None
        rss_end = rss_mb(server.pid) if alive else float("nan")
    finally:
        stop.set()
        _stop_server(server)
    rss = (rss_start or (samples[0][1] if samples else float("nan")), rss_end)
    figures = _figures(args, tally, rss, alive, log_path)
    figures["rss_mb"]["max"] = max((sample[1] for sample in samples), default=None)
    problems = _problems(tally, rss, alive, args.rss_tolerance)
    figures["problems"] = problems
    print(json.dumps(figures, indent=2))
    if args.json:
        report = Path(args.json)
        report.parent.mkdir(parents=True, exist_ok=True)  # make soak's .plughost/ on a clean clone
        report.write_text(json.dumps({**figures, "rss_samples": samples}, indent=2))
    if problems:
        print(f"server log kept in {log_path}")
    else:
        shutil.rmtree(state, ignore_errors=True)
    print("soak: " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
