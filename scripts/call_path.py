#!/usr/bin/env python3
"""The path of one call through the sandbox, measured on a real call.

    .venv/bin/python scripts/call_path.py            # figures
    .venv/bin/python scripts/call_path.py --trace    # and the path itself
    .venv/bin/python scripts/call_path.py --calls 200  # and p50/p90 of 200 serial calls

It runs `ToolRunner.run` on a trivial plugin four times (the first calls pay
the one-time layer detection, the launcher's start and a uid's first sweep;
each is put away before the next) and profiles the last with
`sys.setprofile`, in the calling thread only (putting a call away runs in the
sandbox's closer thread, off the call's path). From the moment
`Sandbox.execute` is entered until it returns, every function entered whose
code lives in `sandbox/` is a *place*; the file execution is in changes on
every call into, and every return out of, such a function. A move between
two places is counted the first time it happens only, so the figures do not
depend on how often the watch loop went round. Printed:

  places     distinct sandbox functions entered (file, qualified name;
             comprehensions and generator expressions are part of their function)
  files      distinct sandbox files among them
  switches   changes of the current sandbox file
  returns    switches back into a file the call had already left

Functions outside `sandbox/` (the standard library, psutil, pydantic) are
transparent: a sandbox function calling `os.read` stays in its file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from host.bytecode import compile_plugin  # noqa: E402
from host.registry import PluginRegistry  # noqa: E402
from sandbox.supervisor import Sandbox  # noqa: E402
from sandbox.tool_runner import ToolRunner  # noqa: E402

SANDBOX = str(ROOT / "sandbox") + "/"
PLUGIN = """
class Plugin:
    def run(self, payload):
        return {"ok": True}
"""


def _place(frame: FrameType) -> tuple[str, str] | None:
    filename = frame.f_code.co_filename
    if not filename.startswith(SANDBOX):
        return None
    qualname = frame.f_code.co_qualname
    while qualname.endswith(">") and ".<locals>." in qualname:
        qualname = qualname.rsplit(".<locals>.", 1)[0]  # a comprehension: its function
    return filename[len(SANDBOX) :], qualname


class PathRecorder:
    """Profile hook: the sequence of sandbox files a call runs in."""

    def __init__(self) -> None:
        self.active = False
        self.places: list[tuple[str, str]] = []
        self.files: list[str] = []  # current file after each change
        self._here: tuple[str, str] | None = None
        self._moves: set[tuple[tuple[str, str] | None, tuple[str, str]]] = set()

    def _now_in(self, place: tuple[str, str]) -> None:
        move = (self._here, place)
        self._here = place
        if move in self._moves:
            return  # the same move again (the watch loop's next round)
        self._moves.add(move)
        if not self.files or self.files[-1] != place[0]:
            self.files.append(place[0])

    def _enclosing(self, frame: FrameType | None) -> tuple[str, str] | None:
        while frame is not None:
            place = _place(frame)
            if place is not None:
                return place
            frame = frame.f_back
        return None

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event not in ("call", "return"):
            return
        place = _place(frame)
        if place is None:
            return
        if event == "call" and place[1] == "Sandbox.execute":
            self.active = True
        if not self.active:
            return
        if event == "call":
            if place not in self.places:
                self.places.append(place)
            self._now_in(place)
        else:
            if place[1] == "Sandbox.execute":
                self.active = False
                return
            back = self._enclosing(frame.f_back)
            if back is not None:
                self._now_in(back)

    def figures(self) -> dict[str, int]:
        seen: set[str] = set()
        returns = 0
        for filename in self.files:
            if filename in seen:
                returns += 1
            seen.add(filename)
        return {
            "places": len(self.places),
            "files": len(seen),
            "switches": max(len(self.files) - 1, 0),
            "returns": returns,
        }


def _latency(runner: ToolRunner, payload: dict[str, Any], calls: int) -> dict[str, float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        _, error = runner.run("trivial", payload)
        times.append((time.perf_counter() - started) * 1000)
        assert not error, error
    times.sort()
    return {
        "calls": calls,
        "p50_ms": round(statistics.median(times), 2),
        "p90_ms": round(times[int(len(times) * 0.9) - 1], 2),
    }


def trivial_plugin(parent: str) -> PluginRegistry:
    """A registry holding `trivial` (returns {"ok": True}), written under
    `parent` and readable by the call uids."""
    directory = Path(parent) / "trivial"
    directory.mkdir()
    (directory / "plugin.toml").write_text(
        'name = "trivial"\nversion = "1.0.0"\nentrypoint = "trivial_mod:Plugin"\n'
    )
    (directory / "trivial_mod.py").write_text(textwrap.dedent(PLUGIN))
    directory.chmod(0o755)
    Path(parent).chmod(0o755)
    compile_plugin(directory)  # as a server does when it starts (host/preparation.py)
    registry = PluginRegistry()
    registry.load_directory(parent)
    return registry


def measure(trace: bool, calls: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        runner = ToolRunner(trivial_plugin(tmp), Sandbox())
        payload = {"image": b"\x89PNG", "mime_type": "image/png", "options": {}}
        try:
            for _ in range(3):  # one-time costs: layer detection, the launcher, a uid's first sweep
                result, error = runner.run("trivial", payload)
                assert not error, error
                runner.sandbox.settle()  # the call's uid is free again once put away
            recorder = PathRecorder()
            sys.setprofile(recorder)
            try:
                result, error = runner.run("trivial", payload)
            finally:
                sys.setprofile(None)
            assert not error and result == {"ok": True}, error
            latency = _latency(runner, payload, calls) if calls else None
        finally:
            runner.sandbox.close()
    out: dict[str, Any] = recorder.figures()
    out["file_names"] = sorted(set(recorder.files))
    if latency is not None:
        out["serial"] = latency
    if trace:
        out["places_in_order"] = [f"{f}:{q}" for f, q in recorder.places]
        out["file_sequence"] = recorder.files
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", action="store_true", help="print the path itself")
    parser.add_argument("--calls", type=int, default=0, help="also time this many serial calls")
    args = parser.parse_args()
    print(json.dumps(measure(args.trace, args.calls), indent=2))


if __name__ == "__main__":
    main()
