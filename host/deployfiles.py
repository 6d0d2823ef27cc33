"""The files an operator deploys with, as an installed wheel carries them.

The wheel ships `docs/` as the data package `plughost_docs` (SECURITY.md
with it): the systemd unit, the Grafana dashboard, the deployment guide and
the security model. `plughost deploy` prints them, the unit written for the
paths of the install that runs it:

    plughost deploy                       where each file is
    plughost deploy systemd [--user U]    the unit, ExecStart= this install's plughost
    plughost deploy grafana               the dashboard's JSON
    plughost deploy guide | security      docs/deploy.md, SECURITY.md
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

# What each name prints, relative to the docs directory.
FILES = {
    "systemd": "systemd/plughost.service",
    "grafana": "grafana-dashboard.json",
    "guide": "deploy.md",
    "security": "SECURITY.md",
}
# The unit's own program path and account, replaced for the install.
UNIT_PROGRAM = "/opt/plughost/bin/plughost"
UNIT_ACCOUNT = "plughost"
_ACCOUNT = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


class DeployError(Exception):
    """A deploy file cannot be found or written as asked; the message says why."""


def docs_dir() -> Path:
    """`docs/` beside the source tree, or the `plughost_docs` package of a wheel."""
    source = Path(__file__).resolve().parent.parent / "docs"
    if (source / FILES["systemd"]).is_file():
        return source
    spec = importlib.util.find_spec("plughost_docs")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    raise DeployError("this install carries no deploy files (no plughost_docs package)")


def path_of(name: str) -> Path:
    """The installed file `name` (a key of FILES) stands for."""
    found = docs_dir() / FILES[name]
    if not found.is_file():
        raise DeployError(f"{found}: missing from this install")
    return found


def program() -> str:
    """This install's `plughost` as ExecStart= takes it: the script beside
    the running interpreter, else the interpreter running the CLI's module.
    Raises DeployError for a path a unit line cannot carry."""
    script = Path(sys.executable).parent / "plughost"
    words = [str(script)] if script.is_file() else [sys.executable, "-m", "host.cli"]
    return " ".join(_unit_word(word) for word in words)


def _unit_word(word: str) -> str:
    """`word` as one word of a unit's command line: `%` doubled (a specifier
    otherwise), quoted if it holds a space; no control character at all."""
    if any(ord(char) < 32 or char in '"\\' for char in word):
        raise DeployError(f"the install's path {word!r} cannot be written into a unit")
    word = word.replace("%", "%%")
    return f'"{word}"' if " " in word else word


def systemd_unit(user: str = UNIT_ACCOUNT) -> str:
    """The systemd unit with ExecStart= this install's plughost, run as `user`."""
    if not _ACCOUNT.fullmatch(user):
        raise DeployError(f"--user {user[:40]!r} is not a user name systemd accepts")
    text = path_of("systemd").read_text()
    text = text.replace(UNIT_PROGRAM, program())
    text = re.sub(r"(?m)^User=.*$", f"User={user}", text)
    return re.sub(r"(?m)^Group=.*$", f"Group={user}", text)


def listing() -> list[tuple[str, Path]]:
    """Every deploy file with where this install has it."""
    return [(name, docs_dir() / relative) for name, relative in FILES.items()]


__all__ = ["FILES", "DeployError", "docs_dir", "listing", "path_of", "program", "systemd_unit"]
