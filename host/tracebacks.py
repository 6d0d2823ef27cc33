"""A plugin's traceback as its author and the operator want to read it.

The child captures the whole traceback of a plugin's exception, with the
sandbox's own frames (the code that called the plugin) folded into
`File "<sandbox>"` lines and every path made the plugin's view of it
(`sandbox.host_paths`). This keeps the plugin's frames (its files, its
packages, the standard library it called) and the exception line, and
drops the host's, folded or not. Clients never see any of it: it lives in
the envelope's `_internal` part.
"""

from __future__ import annotations

import re
from pathlib import Path

import sandbox

_FRAME = re.compile(r'^  File "(?P<file>[^"]+)"(, line \d+|$)')
HOST_CODE = (
    str(Path(sandbox.__file__).resolve().parent) + "/",
    "<frozen importlib.",
    "<sandbox>",
)


def plugin_frames(text: str) -> str:
    """`text` (a formatted traceback) without the host's frames."""
    kept: list[str] = []
    skipping = False
    for line in text.splitlines():
        frame = _FRAME.match(line)
        if frame is not None:
            skipping = frame["file"].startswith(HOST_CODE)
        elif not line.startswith("    "):
            skipping = False  # the header, the exception line, a chained cause
        if not skipping:
            kept.append(line)
    return "\n".join(kept)


def plugin_traceback(envelope: dict[str, object]) -> str:
    """The filtered traceback of a failed call's envelope ("" when it has none)."""
    internal = envelope.get("_internal")
    text = internal.get("traceback", "") if isinstance(internal, dict) else ""
    return plugin_frames(text) if isinstance(text, str) else ""
