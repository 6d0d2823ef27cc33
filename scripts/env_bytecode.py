#!/usr/bin/env python3
"""What an environment's bytecode is worth to a call: the bundled plugins
that import Pillow, each run with its environment as prepared (compiled)
and with a copy of it without bytecode, alternating, in one run.

    .venv/bin/python scripts/env_bytecode.py [--calls 15]

A call's child reads its environment read-only, so without bytecode it
compiles every module it imports, on every call. The environments are
prepared (uv, from the package index) under PLUGHOST_ENV_DIR, or under a
temporary directory. Root only (per-call uids read the copy).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from host.environments import EnvironmentStore  # noqa: E402
from host.registry import PluginRegistry  # noqa: E402
from sandbox.supervisor import Sandbox  # noqa: E402
from sandbox.tool_runner import ToolRunner  # noqa: E402

PLUGINS = ("dominant_colors", "image_info")
SAMPLE = ROOT / "plugins" / "samples" / "sunset.png"


def _registry(environments: EnvironmentStore) -> PluginRegistry:
    registry = PluginRegistry()
    registry.environments = environments
    for name in PLUGINS:
        registry.load_directory(ROOT / "plugins" / name)
    return registry


def _without_bytecode(store: Path, into: Path) -> Path:
    """A copy of the environment store `store` with every __pycache__ left out."""
    copy = into / "envs"
    shutil.copytree(store, copy, ignore=shutil.ignore_patterns("__pycache__", ".cache"))
    for path in (into, copy):
        path.chmod(0o755)
    return copy


def _call_ms(runner: ToolRunner, plugin: str, payload: dict[str, object]) -> float:
    started = time.perf_counter()
    result, error = runner.run(plugin, payload)
    elapsed = (time.perf_counter() - started) * 1000
    if error:
        raise RuntimeError(f"{plugin}: {error['error']['message']}")
    runner.sandbox.settle()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=15, help="serial calls per plugin and way")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="plughost-bytecode-"))
    store = Path(os.environ.get("PLUGHOST_ENV_DIR") or work / "prepared")
    environments = EnvironmentStore(store)
    compiled = _registry(environments)
    for name in PLUGINS:
        state = environments.prepare(name, compiled.get_plugin(name).requirements)
        if state.path is None:
            raise SystemExit(f"{name}: {state.message}")
    bare = _registry(EnvironmentStore(_without_bytecode(store, work / "bare")))
    sandbox = Sandbox()
    try:
        ways = {"compiled": ToolRunner(compiled, sandbox), "no bytecode": ToolRunner(bare, sandbox)}
        payload = {"image": SAMPLE.read_bytes(), "mime_type": "image/png", "options": {}}
        print("| plugin | p50 ms, compiled | p50 ms, no bytecode | calls each |")
        print("|---|---|---|---|")
        for name in PLUGINS:
            times: dict[str, list[float]] = {way: [] for way in ways}
            for runner in ways.values():
                _call_ms(runner, name, payload)  # the launcher's first fork of this plugin
            for _ in range(args.calls):
                for way, runner in ways.items():  # alternating, in the same minutes
                    times[way].append(_call_ms(runner, name, payload))
            p50 = {way: statistics.median(values) for way, values in times.items()}
            print(f"| {name} | {p50['compiled']:.1f} | {p50['no bytecode']:.1f} | {args.calls} |")
    finally:
        sandbox.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
