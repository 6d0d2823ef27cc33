"""plughost's sandbox: processes, limits and the pipe protocol.

It knows nothing of HTTP, jobs or services, and imports nothing of `host`:
it reads plugins through `PluginCatalog` (sandbox/tool_runner.py), a protocol
the host's registry fulfils.

The names below are loaded when first used, not when the package is: the
launcher imports `sandbox.launcher` and with it this package, and must not
carry the host's side (the supervisor, pydantic, psutil) into every fork.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandbox.envelope import Envelope
    from sandbox.limits import CallLimits, HostLimits, PluginLimits
    from sandbox.outcome import REASONS, HostFailure, Outcome, Reason, State, Status
    from sandbox.supervisor import CallSpec, Sandbox

_WHERE = {
    "REASONS": "sandbox.outcome",
    "CallLimits": "sandbox.limits",
    "CallSpec": "sandbox.supervisor",
    "Envelope": "sandbox.envelope",
    "HostFailure": "sandbox.outcome",
    "HostLimits": "sandbox.limits",
    "Outcome": "sandbox.outcome",
    "PluginLimits": "sandbox.limits",
    "Reason": "sandbox.outcome",
    "Sandbox": "sandbox.supervisor",
    "State": "sandbox.outcome",
    "Status": "sandbox.outcome",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "REASONS",
    "CallLimits",
    "CallSpec",
    "Envelope",
    "HostFailure",
    "HostLimits",
    "Outcome",
    "PluginLimits",
    "Reason",
    "Sandbox",
    "State",
    "Status",
]
