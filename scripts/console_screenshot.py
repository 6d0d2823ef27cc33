#!/usr/bin/env python3
"""A screenshot of the console's overview (docs/console.png), from a real host.

    python scripts/console_screenshot.py [--out docs/console.png]

Starts `plughost serve` on a free loopback port with a temporary database and
a temporary plugins directory (a benign plugin and a hostile one), sends a
few calls through the API (successes, a plugin that raises, a crash streak
that ends in quarantine), then opens /console in Debian's chromium through
Playwright and saves the page. The browser tests use the same helpers
(`DemoHost`, `launch_chromium`).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# What works for a headless chromium run as root in a container with no way out.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT_S = 30.0
BENIGN = """
class Plugin:
    def run(self, payload):
        return {"bytes": len(payload["image"]), "mime_type": payload["mime_type"]}
"""
HOSTILE = """
import os


class Plugin:
    def run(self, payload):
        if payload["options"].get("raise"):
            raise RuntimeError("refusing this image")
        os.abort()
"""


def _plugin(root: Path, name: str, code: str, timeout_s: float, memory_mb: int) -> None:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "plugin.toml").write_text(
        f'name = "{name}"\nversion = "1.0.0"\nentrypoint = "{name}:Plugin"\n'
        f'description = "console demo: {name}"\n'
        f"[limits]\ntimeout_s = {timeout_s}\nmemory_mb = {memory_mb}\n"
    )
    (directory / f"{name}.py").write_text(code.lstrip())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def png_b64() -> str:
    return base64.b64encode((ROOT / "plugins/samples/sunset.png").read_bytes()).decode()


class DemoHost:
    """A `plughost serve` process with the demo plugins; a context manager that
    stops it (SIGTERM, then SIGKILL after 20 s) and removes its directory."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="plughost-console-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env or {}
        self.log = self.dir / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DemoHost:
        plugins = self.dir / "plugins"
        _plugin(plugins, "echo_size", BENIGN, timeout_s=5, memory_mb=128)
        _plugin(plugins, "crasher", HOSTILE, timeout_s=5, memory_mb=64)
        command = [sys.executable, "-m", "host.cli", "serve", "--port", str(self.port)]
        command += ["--db", str(self.dir / "jobs.sqlite3"), "--plugins-dir", str(plugins)]
        command += ["--workers", "2"]
        env = {**os.environ, "PLUGHOST_QUARANTINE_THRESHOLD": "2", **self.env}
        with self.log.open("wb") as stream:  # a file: a full pipe would block the server
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stream
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if self.call("GET", "/healthz")[0] == 200:
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"plughost serve did not start: {self.log.read_text()[-3000:]}")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """One API request; returns (status, JSON body)."""
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def analyze(
        self, plugin: str, token: str | None = None, **options: Any
    ) -> tuple[int, dict[str, Any]]:
        body = {"plugin": plugin, "image": png_b64(), "mime_type": "image/png", "options": options}
        return self.call("POST", "/v1/analyze", body, token)


def launch_chromium(playwright: Any) -> Any:
    """Debian's chromium, headless, through Playwright (whose own browser
    download is not used). Playwright starts it with an empty profile
    directory of its own (`--user-data-dir`), removed when it closes."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=CHROMIUM_ARGS,
        timeout=30_000,
    )


def demo_traffic(host: DemoHost) -> None:
    """Successes on several plugins, a plugin error, and a crash streak that
    ends in quarantine."""
    for plugin in ["image_info", "image_info", "dominant_colors", "image_hash", "echo_size"]:
        host.analyze(plugin)
    host.analyze("crasher", **{"raise": True})
    for _ in range(2):
        host.analyze("crasher")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/console.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with DemoHost() as host:
        demo_traffic(host)
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 640})
                page.goto(host.url + "/console", timeout=15_000)
                page.screenshot(path=str(args.out), full_page=True, timeout=15_000)
            finally:
                browser.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
