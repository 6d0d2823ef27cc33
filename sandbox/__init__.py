"""plughost's sandbox: processes, limits and the pipe protocol.

It knows nothing of HTTP, jobs or services, and imports nothing of `host`:
it reads plugins through `PluginCatalog` (sandbox/tool_runner.py), a protocol
the host's registry fulfils.
"""

from sandbox.envelope import Envelope
from sandbox.limits import CallLimits, HostLimits, PluginLimits
from sandbox.outcome import REASONS, HostFailure, Outcome, Reason, State, Status
from sandbox.supervisor import CallSpec, Sandbox

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
