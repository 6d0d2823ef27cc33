"""What one sandboxed call came to, before it becomes a result or an envelope.

`Outcome.status` tells apart the three ways a call ends (as pebble's
`ResultStatus` does): the plugin returned a result, the plugin itself failed
(it raised, returned junk, could not be loaded), or the sandbox stopped it
(timeout, memory, crash, protocol abuse). `REASONS` is the one table that
maps each reason to its envelope type and the plugin state it leaves.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Status(enum.Enum):
    SUCCESS = "success"
    PLUGIN_FAILED = "plugin_failed"
    SANDBOX_STOPPED = "sandbox_stopped"
    HOST_FAILED = "host_failed"


class State(enum.StrEnum):
    """Plugin states kept in the registry."""

    IDLE = "IDLE"
    SUCCESS = "SUCCESS"
    ERROR = "ERROR"
    FAILED = "FAILED"
    UNAVAILABLE = "UNAVAILABLE"


# reason -> (error type, plugin state after the call; None: unchanged)
REASONS: dict[str, tuple[str, State | None]] = {
    "invalid_input": ("ValidationError", None),
    "unknown_plugin": ("ValidationError", None),
    "plugin_raised": ("ExecutionError", State.ERROR),
    "invalid_output": ("ValidationError", State.ERROR),
    "output_too_large": ("PluginError", State.ERROR),
    "load_failed": ("PluginError", State.FAILED),
    "timeout": ("PluginError", State.UNAVAILABLE),
    "memory_limit": ("PluginError", State.UNAVAILABLE),
    "crashed": ("PluginError", State.UNAVAILABLE),
    "protocol_violation": ("PluginError", State.UNAVAILABLE),
    "quarantined": ("PluginError", State.UNAVAILABLE),
    "environment_not_ready": ("PluginError", None),
    "overloaded": ("InternalError", None),
    "cancelled": ("ExecutionError", None),
    "internal": ("InternalError", None),
}


@dataclass
class Outcome:
    """The end of one call. `result` is set only when status is SUCCESS."""

    status: Status
    result: dict[str, Any] | None = None
    reason: str | None = None
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    traceback: str = ""

    @property
    def state(self) -> State | None:
        """Plugin state this outcome leaves (None: unchanged)."""
        if self.status is Status.SUCCESS:
            return State.SUCCESS
        assert self.reason is not None
        return REASONS[self.reason][1]
