"""Keeping the host's paths out of what a call's client is shown.

A failed call's envelope carries text the plugin's process wrote: its
exception's traceback, and the tail of its stderr (where Python's
faulthandler prints the stack of a crash); its author is also shown what
it printed (`ToolRunner.measure`). Such text names files
by their host paths: the plugin's own (under the operator's checkout or
state directory), the standard library's (the interpreter's install path),
and the sandbox's own code that called the plugin (`sandbox/child.py`,
`sandbox/launcher.py`). A client is shown the plugin's frames and output,
never where the host keeps anything:

    a frame in the plugin's directory        relative: "case.py"
    a frame in the plugin's environment      "<packages>/numpy/core.py"
    a frame in the standard library          "<python>/ctypes/__init__.py"
    any other frame (the host's code)        one `File "<sandbox>"` line
                                             for each run of them
    those paths anywhere else in the text    the same, and "<host>" for the
                                             host's prefix, code and cwd

The child formats its own tracebacks so (`sandbox.child`); the runner
passes everything a failed call returns through the same filter
(`ToolRunner`), because the child is untrusted and faulthandler writes
on its own. Only the standard library is imported here: the launcher
loads this module and every child is a fork of it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

HOST_FRAME = '  File "<sandbox>"'
# A frame line of a Python traceback ('  File "x", line 3, in f') or of
# faulthandler ('  File "x", line 3 in f').
_FRAME = re.compile(r'^(?P<indent>[ \t]*)File "(?P<file>[^"\n]*)"(?P<rest>.*)$')


def _stdlib() -> tuple[str, ...]:
    """The standard library's directory (`lib-dynload` is inside it), where
    `os` comes from: a venv's own `lib/pythonX.Y` holds the host's
    site-packages, not the standard library."""
    found = {os.path.dirname(os.__file__), os.path.dirname(os.path.realpath(os.__file__))}
    return tuple(sorted(found))


def _deep(path: str) -> bool:
    """Specific enough to be this host's (not `/`, `/usr` or `/tmp`, which
    every system has and a plugin's output may well name)."""
    return len(Path(path).parts) > 2


def _host_prefixes() -> tuple[str, ...]:
    code = str(Path(__file__).resolve().parent.parent)  # the checkout, or site-packages
    found = {
        sys.prefix,
        sys.exec_prefix,
        sys.base_prefix,
        sys.base_exec_prefix,
        os.path.dirname(sys.executable),
        code,
        os.getcwd(),
    }
    return tuple(sorted(path for path in found if path and _deep(path)))


STDLIB = _stdlib()
HOST_PREFIXES = _host_prefixes()


class HostPaths:
    """The paths of one plugin's calls, and the filter they make."""

    def __init__(self, plugin_dir: str, packages: Iterable[str] = ()) -> None:
        self.plugin_dir = plugin_dir.rstrip("/")
        # Longest first: a plugin directory inside the checkout is the plugin's.
        roots = [(self.plugin_dir, "")] if self.plugin_dir else []
        roots += [(path.rstrip("/"), "<packages>/") for path in packages if path.rstrip("/")]
        roots += [(path, "<python>/") for path in STDLIB]
        self._roots = sorted(roots, key=lambda root: -len(root[0]))
        words = [(root, into.rstrip("/") or ".") for root, into in roots]
        words += [(path, "<host>") for path in HOST_PREFIXES]
        words += [(real, into) for root, into in words if (real := os.path.realpath(root)) != root]
        self._words = sorted(words, key=lambda word: -len(word[0]))

    def frame_file(self, path: str) -> str | None:
        """The name a client may see for a frame's file; None for the host's code."""
        for root, into in self._roots:
            if path.startswith(root + "/"):
                rest = path[len(root) + 1 :]
                if into == "<python>/" and "-packages/" in rest:
                    return None  # the interpreter's site-packages: the host's packages
                return into + rest
        if path == "<sandbox>" or path.startswith("/"):
            return None
        # Already relative (the child's own filter), "<frozen importlib._bootstrap>",
        # "<string>": no host path in it.
        return path

    def _words_of(self, text: str) -> str:
        for root, into in self._words:
            if root in text:
                text = text.replace(root, into)
        return text

    def scrub(self, text: str) -> str:
        """`text` with the host's frames folded into `<sandbox>` lines (their
        source lines dropped) and every host path replaced (table above)."""
        kept: list[str] = []
        in_host = False
        for line in text.split("\n"):
            frame = _FRAME.match(line)
            if frame is not None:
                name = self.frame_file(frame["file"])
                if name is None:
                    if not in_host:
                        kept.append(frame["indent"] + HOST_FRAME.lstrip())
                    in_host = True
                    continue
                in_host = False
                line = f'{frame["indent"]}File "{name}"{self._words_of(frame["rest"])}'
            elif in_host and line.startswith("    "):
                continue  # the source line (and its carets) of a host frame
            else:
                in_host = False
                line = self._words_of(line)
            kept.append(line)
        return "\n".join(kept)

    def scrub_details(self, details: Mapping[str, Any]) -> dict[str, Any]:
        """`details` with every string value scrubbed (tails, exception names)."""
        return {
            key: self.scrub(value) if isinstance(value, str) else value
            for key, value in details.items()
        }
