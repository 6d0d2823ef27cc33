"""plughost's sandbox: processes, limits and the pipe protocol.

It knows nothing of HTTP, jobs or services.
"""

from sandbox.limits import CallLimits, HostLimits, PluginLimits
from sandbox.outcome import REASONS, Outcome, State, Status
from sandbox.supervisor import CallSpec, Sandbox

__all__ = [
    "REASONS",
    "CallLimits",
    "CallSpec",
    "HostLimits",
    "Outcome",
    "PluginLimits",
    "Sandbox",
    "State",
    "Status",
]
