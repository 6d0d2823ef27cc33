"""Hostile case: uses packages it never declared. The launcher that forked the
call had loaded the host's packages (psutil, pydantic, the sandbox's own
modules); the host's environment holds more (FastAPI, uvicorn). A plugin
that imports them gets code the operator never agreed to run for it, and
versions nobody pinned. It tries the cached modules first, then the host's
sys.path (the suite passes it as host_sys_path)."""

import importlib
import sys

WANTED = ("psutil", "pydantic", "pydantic_core", "fastapi", "uvicorn", "sandbox", "host")


def _imported():
    found = []
    for name in WANTED:
        try:
            importlib.import_module(name)
            found.append(name)
        except ImportError:
            pass
    return found


class Plugin:
    def run(self, payload):
        found = _imported()
        sys.path.extend(payload["options"].get("host_sys_path", []))
        importlib.invalidate_caches()
        found += [name for name in _imported() if name not in found]
        if not found:
            raise ImportError("no host package could be imported")
        return {"imported": found}
