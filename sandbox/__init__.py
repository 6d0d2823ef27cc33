"""plughost's sandbox: processes, limits and the pipe protocol.

It knows nothing of HTTP, jobs or services, and imports nothing of `host`:
it reads plugins through `PluginCatalog` (sandbox/tool_runner.py), a protocol
the host's registry fulfils.

The names below are loaded when first used, not when the package is: the
launcher imports `sandbox.launcher` and with it this package, and must not
carry the host's side (the supervisor, pydantic, psutil) into every fork.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandbox.envelope import Envelope
    from sandbox.limits import CallLimits, HostLimits, PluginLimits
    from sandbox.outcome import REASONS, HostFailure, Outcome, Reason, State, Status
    from sandbox.supervisor import CallSpec, Sandbox


def __getattr__(name: str) -> Any:
    if name in ("CallSpec", "Sandbox"):
        from sandbox import supervisor

        return getattr(supervisor, name)
    if name in ("REASONS", "HostFailure", "Outcome", "Reason", "State", "Status"):
        from sandbox import outcome

        return getattr(outcome, name)
    if name in ("CallLimits", "HostLimits", "PluginLimits"):
        from sandbox import limits

        return getattr(limits, name)
    if name == "Envelope":
        from sandbox import envelope

        return envelope.Envelope
    raise AttributeError(f"module 'sandbox' has no attribute {name!r}")


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
