"""The compatibility corpus: plugins built on what image plugins use (process
and thread pools, shared memory, numpy, scipy, scikit-image, OpenCV, Pillow,
onnxruntime), each of which must succeed with the result its manifest's
`[expect] result` table names. Beside the crash suite, which proves that
hostile plugins are contained, this proves that ordinary ones still work:
`plughost crash-suite --compat` on a host before plugins are installed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from host.discovery import BUNDLED_DIR, RegisteredPlugin, find_plugins
from sandbox.tool_runner import ToolRunner

COMPAT_DIR = BUNDLED_DIR / "compat"


@dataclass(frozen=True)
class CompatCase:
    name: str
    expected: dict[str, Any]  # keys the result must hold, with these values
    plugin: RegisteredPlugin


@dataclass(frozen=True)
class CompatReport:
    name: str
    packages: tuple[str, ...]  # what it declares
    ok: bool
    seconds: float  # the call's wall time, as the sandbox measured it
    peak_mb: float | None  # the call's peak memory (the cgroup's where there is one)
    memory_mb: int | None  # its limit
    problem: str  # why it failed; empty when it passed


def load_compat(
    names: Iterable[str] = (), directory: Path = COMPAT_DIR
) -> tuple[list[CompatCase], list[str]]:
    """The corpus's cases (only `names`, if given), and load errors."""
    wanted = set(names)
    found, errors = find_plugins(directory)
    cases = []
    for plugin in found:
        expect = plugin.manifest.expect or {}
        if not isinstance(expect.get("result"), dict):
            errors.append(f"{plugin.directory / 'plugin.toml'}: field 'expect.result' is missing")
        elif not wanted or plugin.name in wanted:
            cases.append(CompatCase(plugin.name, dict(expect["result"]), plugin))
    return sorted(cases, key=lambda case: case.name), errors


def run_compat(
    cases: list[CompatCase],
    runner: ToolRunner,
    image: bytes,
    progress: Callable[[int, int, CompatReport], None] | None = None,
) -> list[CompatReport]:
    """Call each case once on `image`; never raises for a case."""
    payload = {"image": image, "mime_type": "image/png", "options": {}}
    reports = []
    for index, case in enumerate(cases, 1):
        result, error, seen = runner.measure(case.name, payload)
        report = CompatReport(
            name=case.name,
            packages=tuple(str(d) for d in case.plugin.manifest.dependencies),
            ok=not error and _problem(case, result) == "",
            seconds=round(float(seen.get("elapsed_ms", 0.0)) / 1000, 3),
            peak_mb=seen.get("cgroup_peak_mb", seen.get("peak_rss_mb")),
            memory_mb=case.plugin.manifest.limits.memory_mb,
            problem=_envelope_problem(error) if error else _problem(case, result),
        )
        reports.append(report)
        if progress is not None:
            progress(index, len(cases), report)
    return reports


def _problem(case: CompatCase, result: dict[str, Any]) -> str:
    wrong = [
        f"{key}: expected {value!r}, got {result.get(key)!r}"
        for key, value in case.expected.items()
        if result.get(key) != value
    ]
    return "; ".join(wrong)


def _envelope_problem(error: dict[str, Any]) -> str:
    body = error.get("error", {})
    reason = body.get("details", {}).get("reason", body.get("type", "error"))
    return f"{reason}: {body.get('message', '')}"


def format_compat(reports: list[CompatReport]) -> str:
    """A table of the run, and a summary line."""
    rows = [("CASE", "PACKAGES", "VERDICT", "TIME", "PEAK MB", "LIMIT MB", "PROBLEM")]
    for r in reports:
        peak = "-" if r.peak_mb is None else f"{r.peak_mb:.1f}"
        rows.append(
            (
                r.name,
                ", ".join(r.packages) or "(standard library)",
                "pass" if r.ok else "FAIL",
                f"{r.seconds:.2f}s",
                peak,
                str(r.memory_mb or "-"),
                r.problem[:120],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    passed = sum(r.ok for r in reports)
    lines.append(f"{passed} of {len(reports)} compatibility cases passed")
    return "\n".join(lines)
