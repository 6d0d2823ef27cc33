"""`plughost check DIR`: a plugin author's loop, and a CI gate.

First every problem found without running code (host/checker.py). Then the
plugin's environment is prepared as the host would prepare it, and the plugin
is run in the real sandbox on the bundled sample images (and the images the
author names), each call's time and peak memory printed against the limits
its manifest declares, and what it printed (stdout and stderr, the first
64 KiB of each). A failed call shows the plugin's own traceback.
The exit status is 0 only when nothing is wrong.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from host.checker import Problem, distribution_of, static_problems
from host.discovery import BUNDLED_DIR, find_plugins
from host.environments import EnvironmentStore, EnvStatus
from host.manifest import Manifest
from host.registry import PluginRegistry
from host.tracebacks import plugin_output, plugin_traceback, printable
from sandbox.envelope import Envelope
from sandbox.limits import HostLimits
from sandbox.tool_runner import ToolRunner

SAMPLES_DIR = BUNDLED_DIR / "samples"
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
}


@dataclass
class CallReport:
    image: Path
    ok: bool
    elapsed_ms: float
    peak_mb: float | None  # None: not measured
    message: str = ""
    output: str = ""  # what the call printed, as `plugin_output` shows it


def sample_images(extra: Iterable[Path] = ()) -> list[Path]:
    """The bundled samples, then the author's own images."""
    found = sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in IMAGE_TYPES)
    return [*found, *extra]


def _call(runner: ToolRunner, name: str, image: Path, manifest: Manifest) -> CallReport:
    mime = IMAGE_TYPES.get(image.suffix.lower(), "image/png")
    payload = {"image": image.read_bytes(), "mime_type": mime, "options": {}}
    result, error, measured = runner.measure(name, payload)
    elapsed = float(measured.get("elapsed_ms", 0.0))
    peak = measured.get("cgroup_peak_mb") or measured.get("peak_rss_mb")
    peak = float(peak) if isinstance(peak, int | float) else None
    printed = plugin_output(measured, indent="    ")
    if error:
        envelope = Envelope.of(error)
        text = printable(f"{envelope.reason}: {envelope.message}")
        hint = missing_module_hint(error)
        trace = plugin_traceback(error)
        text += "".join(f"\n{part}" for part in (hint, trace) if part)
        return CallReport(image, False, elapsed, peak, text, printed)
    limits = runner.limits.clamp(manifest.plugin_limits)
    if elapsed > limits.timeout_s * 1000 * 0.8:
        return CallReport(image, False, elapsed, peak, "took over 80% of timeout_s", printed)
    return CallReport(image, True, elapsed, peak, f"{len(result)} keys", printed)


_NO_MODULE = re.compile(r"^No module named '(?P<name>[^']+)'")


def missing_module_hint(error: dict[str, Any]) -> str:
    """For a plugin that could not import a module: which one, and what to
    declare ("" for any other failure)."""
    envelope = Envelope.of(error)
    found = _NO_MODULE.match(envelope.message)
    if envelope.reason != "load_failed" or found is None:
        return ""
    module = found["name"].split(".")[0]
    return (
        f"the plugin imports {module!r}, which is not installed for it: a call imports only "
        "the standard library, the plugin's own files and the packages plugin.toml's "
        f'`dependencies` declare; add "{distribution_of(module)}" to `dependencies`'
    )


def _prepare(registry: PluginRegistry, name: str, out: TextIO) -> Problem | None:
    plugin = registry.get_plugin(name)
    store = registry.environments
    if plugin.requirements.empty or store is None:
        return None
    print(f"preparing the environment: {', '.join(plugin.requirements.dependencies)}", file=out)
    state = store.prepare(name, plugin.requirements, lambda line: print(f"  {line}", file=out))
    if state.status is not EnvStatus.READY:
        return Problem(Path(plugin.requirements.source), state.message)
    print(f"environment ready: {', '.join(state.packages)}", file=out)
    return None


def check_plugin(
    directory: Path,
    images: Iterable[Path],
    environments: EnvironmentStore,
    runner_for: Any,
    out: TextIO = sys.stdout,
) -> int:
    """Check the plugin in `directory`; print the findings; return the exit status.

    `runner_for(registry)` gives the ToolRunner to run the calls with (the
    CLI's sandbox)."""
    host = HostLimits()
    manifest, problems = static_problems(directory, host)
    for problem in problems:
        print(f"problem: {problem}", file=out)
    if manifest is None:
        return 1
    registry = PluginRegistry()
    registry.environments = environments
    found, errors = find_plugins(directory)
    if errors or not found:
        for text in errors:
            print(f"problem: {text}", file=out)
        return 1
    registry.register(manifest.name, found[0])
    failed = _prepare(registry, manifest.name, out)
    if failed is not None:
        print(f"problem: {failed}", file=out)
        return 1
    if manifest.options is None:
        print("warning: no [options] schema: options are passed to the plugin unchecked", file=out)
    return _run_samples(runner_for(registry), manifest, list(images), out)


def _run_samples(runner: ToolRunner, manifest: Manifest, images: list[Path], out: TextIO) -> int:
    limits = runner.limits.clamp(manifest.plugin_limits)
    print(f"\n{'IMAGE':<28} {'RESULT':<6} {'TIME':>9} {'PEAK':>9}", file=out)
    status = 0
    for image in images:
        report = _call(runner, manifest.name, image, manifest)
        status |= 0 if report.ok else 1
        peak = "n/a" if report.peak_mb is None else f"{report.peak_mb:.1f}MB"
        print(
            f"{image.name[:28]:<28} {'ok' if report.ok else 'FAILED':<6} "
            f"{report.elapsed_ms:>7.1f}ms {peak:>9}  {report.message}",
            file=out,
        )
        if report.output:
            print(f"  what it printed:\n{report.output}", file=out)
    print(
        f"limits: timeout {limits.timeout_s:g} s, memory {limits.memory_mb} MB "
        f"(declared: {manifest.limits.timeout_s}, {manifest.limits.memory_mb})",
        file=out,
    )
    print("check passed" if status == 0 else "check FAILED", file=out)
    return status
