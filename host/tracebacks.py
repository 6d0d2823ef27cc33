"""A plugin's traceback and output as its author and the operator want to read them.

The child captures the whole traceback of a plugin's exception, with the
sandbox's own frames (the code that called the plugin) folded into
`File "<sandbox>"` lines and every path made the plugin's view of it
(`sandbox.host_paths`). This keeps the plugin's frames (its files, its
packages, the standard library it called) and the exception line, and
drops the host's, folded or not (and the standard library's `importlib`
call that imported the plugin). Clients never see any of it: it lives in
the envelope's `_internal` part.

What a call printed (`ToolRunner.measure`'s `output`) is shown to its
author by `plughost check`, `plughost run --debug` and the pytest fixture,
through `plugin_output`; a server neither answers nor logs it.
"""

from __future__ import annotations

import re
from pathlib import Path

import sandbox

_FRAME = re.compile(r'^  File "(?P<file>[^"]+)"(, line \d+|$)')
HOST_CODE = (
    str(Path(sandbox.__file__).resolve().parent) + "/",
    "<frozen importlib.",
    "<python>/importlib/__init__.py",  # the child's import_module of the plugin
    "<sandbox>",
)
# Control characters but newline and tab: a terminal would obey them.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


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
    """The filtered traceback of a failed call's envelope ("" when it has none),
    its control characters shown (`printable`): it quotes the plugin's text."""
    internal = envelope.get("_internal")
    text = internal.get("traceback", "") if isinstance(internal, dict) else ""
    return printable(plugin_frames(text)) if isinstance(text, str) else ""


def printable(text: str) -> str:
    """`text` with its control characters (escape sequences a terminal would
    obey) shown as `\\xNN`: a plugin's output may be anyone's."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found[0]):02x}", text)


def plugin_output(measured: dict[str, object], indent: str = "  ") -> str:
    """What the call printed, as `ToolRunner.measure` measured it: a block per
    stream (`stdout:` then its lines, indented), "" when it printed nothing."""
    output = measured.get("output")
    if not isinstance(output, dict):
        return ""
    blocks = []
    for name in ("stdout", "stderr"):
        text = output.get(name)
        if isinstance(text, str) and text:
            lines = printable(text.rstrip("\n")).splitlines()
            blocks.append(f"{indent}{name}:\n" + "\n".join(f"{indent}  {line}" for line in lines))
    return "\n".join(blocks)
