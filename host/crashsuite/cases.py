"""The cases: hostile plugin directories whose manifest carries an `[expect]` table."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from host.discovery import BUNDLED_DIR, RegisteredPlugin, find_plugins

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
