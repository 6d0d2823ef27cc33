"""The cases: hostile plugin directories whose manifest carries an `[expect]` table."""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from host.discovery import BUNDLED_DIR, RegisteredPlugin, find_plugins
from sandbox.limits import HostLimits

HOSTILE_DIR = BUNDLED_DIR / "hostile"
CLAIMS = (
    "host_alive",
    "no_process_left",
    "no_fd_left",
    "no_file_outside_scratch",
    "host_rss_stable",
)
# A case may also list "no_host_path" (checked only where listed): its
# envelope names no host path.


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    expected: tuple[str, ...]
    requires: tuple[str, ...]
    claims: tuple[str, ...]
    plugin: RegisteredPlugin


def case_of(plugin: RegisteredPlugin) -> Case | str:
    """The case `plugin` describes, or the load error of its manifest."""
    expect = plugin.manifest.expect
    if not expect or not isinstance(expect.get("outcome"), list):
        return f"{plugin.directory / 'plugin.toml'}: field 'expect.outcome' is missing"
    return Case(
        name=plugin.name,
        category=str(expect.get("category", "other")),
        expected=tuple(str(o) for o in expect["outcome"]),
        requires=tuple(str(r) for r in expect.get("requires", [])),
        claims=tuple(str(c) for c in expect.get("claims", CLAIMS)),
        plugin=plugin,
    )


def load_cases(
    dirs: Iterable[str | Path] = (),
    names: Iterable[str] = (),
    categories: Iterable[str] = (),
) -> tuple[list[Case], list[str]]:
    """Cases from the bundled corpus plus `dirs`, filtered; and load errors."""
    wanted, kinds = set(names), set(categories)
    cases: list[Case] = []
    errors: list[str] = []
    for directory in [HOSTILE_DIR, *map(Path, dirs)]:
        found, problems = find_plugins(Path(directory))
        errors += problems
        for plugin in found:
            case = case_of(plugin)
            if isinstance(case, str):
                errors.append(case)
            elif (not wanted or case.name in wanted) and (not kinds or case.category in kinds):
                cases.append(case)
    return cases, errors


def timeout_of(case: Case) -> float:
    """The case's timeout in seconds: its manifest's, or the host's default."""
    wanted = case.plugin.manifest.limits.timeout_s
    return HostLimits().timeout_s if wanted is None else wanted


def scaled(case: Case, factor: float) -> Case:
    """`case` with its timeout multiplied by `factor`; what it expects is
    unchanged (a slow machine gets more time, not other verdicts)."""
    if factor == 1:
        return case
    return dataclasses.replace(case, plugin=scaled_plugin(case.plugin, factor))


def scaled_plugin(plugin: RegisteredPlugin, factor: float) -> RegisteredPlugin:
    """`plugin` with its manifest's timeout (or the host's default)
    multiplied by `factor`."""
    if factor == 1:
        return plugin
    manifest = plugin.manifest
    wanted = manifest.limits.timeout_s
    timeout = (HostLimits().timeout_s if wanted is None else wanted) * factor
    limits = manifest.limits.model_copy(update={"timeout_s": timeout})
    return dataclasses.replace(plugin, manifest=manifest.model_copy(update={"limits": limits}))


_TIMEOUT = re.compile(r"^timeout_s\s*=.*$", re.M)


def write_corpus(cases: Iterable[Case], directory: Path, factor: float) -> list[Path]:
    """Copy each case's plugin directory into `directory`, its manifest's
    timeout multiplied by `factor` (names unchanged), for a server to load
    with `--plugins-dir` in place of the bundled corpus; return the copies.
    `directory` must not exist: it is made here (0755, for the server's user
    to read), so nobody else can have put links in it. Raises FileExistsError."""
    written = []
    directory.mkdir(mode=0o755, parents=False, exist_ok=False)
    for case in cases:
        target = directory / case.name
        shutil.copytree(case.plugin.directory, target, ignore=shutil.ignore_patterns("__pycache__"))
        manifest = target / "plugin.toml"
        text = manifest.read_text(encoding="utf-8")
        line = f"timeout_s = {timeout_of(case) * factor:g}"
        if _TIMEOUT.search(text):
            text = _TIMEOUT.sub(line, text, count=1)
        elif re.search(r"^\[limits\]\s*$", text, re.M):
            text = re.sub(r"^\[limits\]\s*$", f"[limits]\n{line}", text, count=1, flags=re.M)
        else:
            text = text.rstrip("\n") + f"\n\n[limits]\n{line}\n"
        manifest.write_text(text, encoding="utf-8")
        written.append(target)
    return written
