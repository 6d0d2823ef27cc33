"""What one sandboxed call came to, and the one table of the reasons a call can fail.

`Outcome.status` tells apart the ways a call ends (as pebble's `ResultStatus`
does): the plugin returned a result, the plugin itself failed (it raised,
returned junk, could not be loaded), or the sandbox stopped it (timeout,
memory, crash, protocol abuse). A failure of the host itself (no uid free,
the launcher gone, limits that cannot be applied) is not an outcome: the
sandbox raises `HostFailure`, and the ToolRunner answers it as `internal`.

`REASONS` is the one table of failure reasons. Every layer reads it: the
envelope takes its error type from it, the registry the plugin state a call
leaves, the quarantine whether an outcome counts against the plugin's health,
the HTTP API its status code, and the child the reasons it may report itself.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class Status(enum.Enum):
    SUCCESS = "success"
    PLUGIN_FAILED = "plugin_failed"
    SANDBOX_STOPPED = "sandbox_stopped"


class State(enum.StrEnum):
    """Plugin states kept in the registry."""

    IDLE = "IDLE"
    SUCCESS = "SUCCESS"
    ERROR = "ERROR"
    FAILED = "FAILED"
    UNAVAILABLE = "UNAVAILABLE"


class Origin(enum.Enum):
    """Who decides a reason: the child reports it, the sandbox judges it, or
    the host refuses or fails before or around the call."""

    CHILD = "child"
    SANDBOX = "sandbox"
    HOST = "host"


@dataclass(frozen=True)
class Reason:
    """One failure reason: how it is typed, what it does to the plugin, how it is served.

    `state`: the plugin state the call leaves (None: unchanged). `health`:
    whether the outcome counts for quarantine (None: it says nothing of the
    plugin's health; False: a healthy answer; True: the plugin was unavailable).
    `http_status`: the status the HTTP API answers with.
    """

    error_type: str
    state: State | None
    http_status: int
    description: str
    origin: Origin
    health: bool | None = False


_V, _E, _P, _I = "ValidationError", "ExecutionError", "PluginError", "InternalError"
_C, _S, _H = Origin.CHILD, Origin.SANDBOX, Origin.HOST
_U = State.UNAVAILABLE

REASONS: Mapping[str, Reason] = {
    # plugin calls
    "invalid_input": Reason(_V, None, 400, "payload or request invalid", _H, None),
    "unknown_plugin": Reason(_V, None, 404, "no such plugin", _H, None),
    "plugin_raised": Reason(_E, State.ERROR, 400, "plugin raised an exception", _C),
    "invalid_output": Reason(_V, State.ERROR, 400, "plugin returned non-JSON data", _C),
    "output_too_large": Reason(_P, State.ERROR, 400, "result over the output limit", _C),
    "load_failed": Reason(_P, State.FAILED, 400, "plugin could not be loaded", _C),
    "timeout": Reason(_P, _U, 400, "wall-clock timeout", _S, True),
    "memory_limit": Reason(_P, _U, 400, "memory limit exceeded", _C, True),
    "crashed": Reason(_P, _U, 400, "child died without a reply", _S, True),
    "protocol_violation": Reason(_P, _U, 400, "garbage on the pipe", _S, True),
    "quarantined": Reason(_P, _U, 503, "plugin quarantined after unavailable outcomes", _H, True),
    "environment_not_ready": Reason(
        _P, None, 503, "the plugin's declared packages are not installed yet", _H, None
    ),
    "environment_failed": Reason(
        _P, None, 424, "the plugin's declared packages could not be installed", _H, None
    ),
    "overloaded": Reason(_I, None, 503, "host saturated (queue full)", _H, None),
    "shutting_down": Reason(_I, None, 503, "the host is shutting down", _H, None),
    "cancelled": Reason(_E, None, 409, "job cancelled by the client", _S, None),
    "internal": Reason(_I, None, 500, "bug or failure in the host itself", _H, None),
    # jobs and HTTP
    "interrupted": Reason(_I, None, 500, "job interrupted by a host restart", _H, None),
    "unknown_job": Reason(_V, None, 404, "no such job", _H, None),
    "job_finished": Reason(_V, None, 409, "job already finished", _H, None),
    "not_found": Reason(_V, None, 404, "no such route", _H, None),
    "method_not_allowed": Reason(_V, None, 405, "method not allowed on the route", _H, None),
    "payload_too_large": Reason(_V, None, 413, "request body too large", _H, None),
    "unauthorized": Reason(_V, None, 401, "missing or unknown token", _H, None),
    "forbidden": Reason(_V, None, 403, "token may not do that", _H, None),
    "quota_exceeded": Reason(_V, None, 429, "client quota reached", _H, None),
    "idempotency_key_reused": Reason(
        _V, None, 409, "idempotency key used for a different request", _H, None
    ),
    # a multi-node deployment (docs/scale-out.md)
    "database_unavailable": Reason(_I, None, 503, "the shared job database is down", _H, None),
    "no_worker": Reason(_I, None, 503, "no live worker node has this plugin version", _H, None),
}

# Reasons the child may report about itself on the pipe.
CHILD_REASONS = frozenset(name for name, r in REASONS.items() if r.origin is Origin.CHILD)


def reason_of(name: str) -> Reason:
    """The table entry of `name`; an unknown name is a host bug, answered as `internal`."""
    return REASONS.get(name) or REASONS["internal"]


class HostFailure(Exception):
    """The host could not run the call (no uid free, the launcher gone, limits
    that cannot be applied): not the plugin's doing. Carries the evidence."""

    def __init__(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = dict(details or {})


@dataclass
class Outcome:
    """The end of one call. `result` is set only when status is SUCCESS."""

    status: Status
    result: dict[str, Any] | None = None
    reason: str | None = None
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    traceback: str = ""
    # What the plugin printed ("stdout", "stderr": the head of each, bounded):
    # for its author (`ToolRunner.measure`), never part of an envelope.
    output: dict[str, str] = field(default_factory=dict)

    @property
    def state(self) -> State | None:
        """Plugin state this outcome leaves (None: unchanged)."""
        if self.status is Status.SUCCESS:
            return State.SUCCESS
        assert self.reason is not None
        return reason_of(self.reason).state
