"""The state directory: where a host keeps its job database and the plugins'
environments (`Settings.state_dir`).

A directory plughost creates for it, and every missing parent on the way,
is made 0700: the host's user alone may enter it. An existing one is the
operator's: plughost leaves its mode alone (a group may be meant to read
backups there) and logs a warning when its group or others may enter it.
What plughost keeps inside is private on its own (the job database and its
journal files 0600; the environments are read by the call uids only through
the sandbox's minimal root).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("plughost.state")

PRIVATE = 0o700


def make_private_dir(path: str | Path) -> Path:
    """Create `path` and its missing parents 0700 (whatever the umask), or
    warn when an existing one is open to its group or others. Returns the path.
    Raises OSError when it cannot be created."""
    directory = Path(path)
    missing = []
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for created in reversed(missing):
        try:
            os.mkdir(created, PRIVATE)
        except FileExistsError:  # made meanwhile by someone else: theirs
            continue
        os.chmod(created, PRIVATE)  # the umask may have taken bits away
    if not missing:
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        if mode & 0o077:
            log.warning(
                "state directory %s is mode %04o: its group or others may enter it; "
                "plughost creates it 0700 (chmod 700 it unless that is meant)",
                directory,
                mode,
            )
    return directory


__all__ = ["make_private_dir"]
