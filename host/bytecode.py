"""A plugin's own modules compiled once, outside any call.

A call sees its plugin's directory read-only, so Python cannot write the
bytecode it compiles there: without this, every call compiles every module
of the plugin it imports (0.25-0.3 ms for a one-line plugin, more for a
real one). `compile_plugin` writes the bytecode into the directory's
`__pycache__`, as an import by the directory's owner would; the call's
import checks each file against its source (size and mtime) and compiles
anew one that no longer matches.

The host does this with its own privileges in a directory a plugin author
wrote, so it writes only where nobody else could have placed a link:
directories and sources owned by the host's user and writable by nobody
else, regular files only, no symbolic link followed. A source that not
everyone may read gets no bytecode (which every call uid must read).
Anything else is left alone, and its calls compile as before.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import py_compile
import stat
import struct
from pathlib import Path

log = logging.getLogger("plughost.bytecode")

MAX_MODULES = 2000  # per plugin directory; a larger tree is compiled up to here
MAX_SOURCE_BYTES = 4 << 20  # a larger module is left to its calls


def _ours(info: os.stat_result) -> bool:
    """Owned by this process's user and writable by no one else."""
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def compile_plugin(directory: str | Path) -> int:
    """Write the bytecode of the modules in the plugin `directory` (and the
    directories below it) that have none or a stale one; return how many
    were written. Never raises for what it finds there."""
    written = 0
    seen = 0
    root = Path(directory)
    if not _safe_dir(root):
        return 0
    for here, dirs, files in os.walk(root, followlinks=False):
        # Below a directory someone else could write, nothing is trusted.
        dirs[:] = [d for d in dirs if d != "__pycache__" and _safe_dir(Path(here) / d)]
        if not _safe_dir(Path(here) / "__pycache__", missing_ok=True):
            continue
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            seen += 1
            if seen > MAX_MODULES:
                log.info("compiled the first %d modules of %s", MAX_MODULES, root)
                return written
            written += _compile_one(Path(here) / name)
    return written


def _safe_dir(path: Path, missing_ok: bool = False) -> bool:
    """`path` is a directory of ours (or, with `missing_ok`, absent: made here)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return missing_ok
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and _ours(info)


def _compile_one(source: Path) -> int:
    try:
        info = source.lstat()
        if not stat.S_ISREG(info.st_mode) or not _ours(info) or info.st_size > MAX_SOURCE_BYTES:
            return 0
        if not info.st_mode & stat.S_IROTH:
            return 0  # no call reads it; its bytecode would show what it holds to everyone
        target = Path(importlib.util.cache_from_source(str(source)))
        if _fresh(target, info):
            return 0
        py_compile.compile(str(source), cfile=str(target), doraise=True)
        # Every call uid reads it; the directory's owner alone writes.
        target.parent.chmod(0o755)
        target.chmod(0o644)
        return 1
    except (
        OSError,
        py_compile.PyCompileError,
        ValueError,
        SyntaxError,
        RecursionError,
        MemoryError,
    ):
        return 0  # its calls compile it, and fail on it, as before


def _fresh(target: Path, source: os.stat_result) -> bool:
    """The bytecode at `target` matches the source as Python checks it (the
    header compileall compares too: magic, flags 0, mtime, size)."""
    expected = struct.pack(
        "<4sLLL",
        importlib.util.MAGIC_NUMBER,
        0,
        int(source.st_mtime) & 0xFFFFFFFF,
        source.st_size & 0xFFFFFFFF,
    )
    try:
        with target.open("rb") as stream:
            return stream.read(16) == expected
    except OSError:
        return False


__all__ = ["compile_plugin"]
