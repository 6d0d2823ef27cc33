"""Running one case and checking its claims.

A case passes when the observed outcome is one of its `expected`, the outcome
can be served as strict UTF-8 JSON (a lone surrogate or NaN in it would be a
500 at the API), and every claim holds afterwards. A case whose `requires`
names a layer the host does not have is NOT DEFENDED, never passed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

import sandbox
from host.crashsuite.cases import Case
from host.crashsuite.report import FAIL, NOT_DEFENDED, PASS, CaseReport
from host.crashsuite.targets import Target
from sandbox.envelope import Envelope
from sandbox.supervisor import uid_range

WATCHED_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
RSS_TOLERANCE_MB = 64.0
# How long a call's processes get to be gone after its answer (scaled with the run).
LEFTOVER_WAIT_S = 2.0
# The sandbox's own code, wherever it is installed.
HOST_CODE_NAMES = ("site-packages/sandbox", "sandbox/child.py", "sandbox/launcher.py")


def observed_of(result: dict[str, Any], error: dict[str, Any]) -> str:
    """`success`, or `Type:reason` of the envelope."""
    if not error:
        return "success"
    envelope = Envelope.of(error)
    return f"{envelope.error_type}:{envelope.reason}"


def unservable(result: dict[str, Any], error: dict[str, Any]) -> str | None:
    """Why the API could not answer with this outcome (strict JSON, UTF-8), or None."""
    try:
        json.dumps([result, error], ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        return f"the outcome cannot be served as JSON: {str(exc)[:100]}"
    return None


def host_paths_in(error: dict[str, Any], plugin_dir: Path) -> list[str]:
    """The host paths an envelope shows (its public part and its traceback):
    the interpreter's prefixes, the host's code and working directory, the
    plugin's directory; a client may see the plugin's files only relative
    to it (`sandbox.host_paths`)."""
    text = json.dumps(error, ensure_ascii=False)
    code = str(Path(sandbox.__file__).resolve().parent.parent)
    places = {sys.prefix, sys.base_prefix, sys.exec_prefix, code, os.getcwd(), str(plugin_dir)}
    deep = [place for place in places if len(Path(place).parts) > 2]
    return sorted(word for word in [*deep, *HOST_CODE_NAMES] if word in text)


def stray_files(extra_dirs: Iterable[Path] = (), host_dirs: Iterable[Path] = ()) -> set[str]:
    """Entries owned by a sandbox uid in the world-writable dirs and `extra_dirs`,
    and every entry, whoever owns it, in `host_dirs` (the host's working and
    state directories, where a root-owned core dump of a call would land)."""
    found = set()
    for directory in [*map(Path, WATCHED_DIRS), *extra_dirs]:
        try:
            entries = list(directory.iterdir())
        except OSError:
            continue
        for entry in entries:
            try:
                uid = entry.lstat().st_uid
            except OSError:
                continue
            if uid in uid_range() or entry.name.startswith("plughost-escape"):
                found.add(str(entry))
    for directory in host_dirs:
        with contextlib.suppress(OSError):
            found.update(str(entry) for entry in directory.iterdir())
    return found


def settle_leftovers(target: Target, deadline_s: float = LEFTOVER_WAIT_S) -> int:
    """Leftover processes of the last call, once they had `deadline_s` to go."""
    end = time.monotonic() + deadline_s
    while (left := target.leftover_processes()) and time.monotonic() < end:
        time.sleep(0.02)
    return left


@dataclass
class _Before:
    """What the host looked like before a case ran."""

    fds: int
    rss: int
    files: set[str]


@dataclass
class _After:
    observed: str
    seconds: float
    leftover: int
    time_scale: float = 1.0
    fds: int | None = None
    rss_mb: float | None = None


def _fds_at_rest(target: Target, samples: int = 5) -> int:
    """The host's descriptor count at rest: the least of a few counts. The
    host's own threads hold descriptors for a moment now and then (a warm
    child's stop being asked for, the keeper's wake-up pipe); a moment's
    descriptor only ever adds to a count."""
    counts = []
    for _ in range(samples):
        counts.append(target.host_fds())
        time.sleep(0.005)
    return min(counts)


def _fds_left(target: Target, before: int, deadline_s: float) -> int:
    """Descriptors the host holds now beyond `before`, once a moment's ones
    had `deadline_s` to go: a leaked descriptor stays open for good."""
    end = time.monotonic() + deadline_s
    while (left := _fds_at_rest(target) - before) > 0 and time.monotonic() < end:
        target.settle()
        time.sleep(0.05)
    return left


def _host_problems(case: Case, target: Target, before: _Before, after: _After) -> list[str]:
    """The host-side claims: alive, no process, descriptor, RSS or file left."""
    problems = []
    if "host_alive" in case.claims and not target.alive():
        problems.append("the host stopped answering")
    if "no_process_left" in case.claims and after.leftover:
        problems.append(f"{after.leftover} process(es) left behind")
    if target.local:
        process = psutil.Process()
        after.fds = _fds_left(target, before.fds, LEFTOVER_WAIT_S * after.time_scale)
        after.rss_mb = (process.memory_info().rss - before.rss) / 2**20
        if "no_fd_left" in case.claims and after.fds > 0:
            problems.append(f"{after.fds} descriptor(s) left open in the host")
        if "host_rss_stable" in case.claims and after.rss_mb > RSS_TOLERANCE_MB:
            problems.append(f"host RSS grew by {after.rss_mb:.0f} MB")
    new_files = stray_files([case.plugin.directory], [Path.cwd()]) - before.files
    if "no_file_outside_scratch" in case.claims and new_files:
        problems.append(f"files written outside the scratch directory: {sorted(new_files)[:5]}")
    return problems


def _verdict(
    case: Case, target: Target, protections: dict[str, bool], problems: list[str], leftover: int
) -> str:
    # "a|b": either layer is enough.
    missing = [r for r in case.requires if not any(protections.get(a) for a in r.split("|"))]
    if not missing:
        return FAIL if problems else PASS
    problems.insert(0, f"not defended here: needs {', '.join(missing)}")
    if leftover:
        target.end_leftovers()  # so the cases after it are judged on their own
    return NOT_DEFENDED


def run_case(
    case: Case,
    target: Target,
    image: bytes,
    options: dict[str, Any],
    protections: dict[str, bool],
    time_scale: float = 1.0,
) -> CaseReport:
    """Run one case and check its claims; the time a call's processes get to
    be gone is scaled by `time_scale`, as the case's own timeout is."""
    process = psutil.Process()
    target.settle()
    before = _Before(
        _fds_at_rest(target),
        process.memory_info().rss,
        stray_files([case.plugin.directory], [Path.cwd()]),
    )
    started = time.monotonic()
    result, error = target.call(case.name, image, options)
    seconds = time.monotonic() - started
    observed = observed_of(result, error)
    target.settle()  # replacement warm children land in the pool first
    after = _After(
        observed, seconds, settle_leftovers(target, LEFTOVER_WAIT_S * time_scale), time_scale
    )
    problems = []
    if observed not in case.expected:
        problems.append(f"expected {' or '.join(case.expected)}, observed {observed}")
    if problem := unservable(result, error):
        problems.append(problem)
    if "no_host_path" in case.claims and (shown := host_paths_in(error, case.plugin.directory)):
        problems.append(f"the outcome shows host paths: {shown}")
    problems += _host_problems(case, target, before, after)
    verdict = _verdict(case, target, protections, problems, after.leftover)
    return CaseReport(
        name=case.name,
        category=case.category,
        expected=list(case.expected),
        observed=observed,
        verdict=verdict,
        seconds=round(seconds, 3),
        leftover_processes=after.leftover,
        leftover_fds=after.fds,
        rss_change_mb=None if after.rss_mb is None else round(after.rss_mb, 1),
        problems=problems,
        message=Envelope.of(error).message[:200] if error else "",
    )
