"""The structured error envelope every failed call is answered with (SPEC section 5).

`Envelope` is the typed form; `Envelope.to_dict()` is the wire form that
`ToolRunner.run` returns and the services pass on::

    {"error": {"type", "message", "details": {"reason", ...}, "plugin", "timestamp"},
     "_internal": {"traceback"}}

Code that needs a part of an envelope reads it through `Envelope.of(...)`
(`.reason`, `.public()`), never by picking the dict apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sandbox.jsonbounds import replace_surrogates
from sandbox.outcome import reason_of


def _one_line(message: str, reason: str) -> str:
    """`message` cut to one bounded line of valid UTF-8 text (it may come from a plugin)."""
    return replace_surrogates((message.splitlines() or [""])[0][:500]) or reason


@dataclass(frozen=True)
class Envelope:
    """One error answer. Its error type comes from the reason table."""

    reason: str
    message: str
    plugin: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    traceback: str = ""
    timestamp: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @classmethod
    def build(
        cls,
        reason: str,
        message: str,
        plugin: str | None = None,
        details: Mapping[str, Any] | None = None,
        traceback: str = "",
    ) -> Envelope:
        """An envelope with its message made one valid line."""
        return cls(reason, _one_line(message, reason), plugin, dict(details or {}), traceback)

    @property
    def error_type(self) -> str:
        return reason_of(self.reason).error_type

    def public(self) -> dict[str, Any]:
        """The part that may leave the host (no `_internal`): `error["error"]`."""
        return {
            "type": self.error_type,
            "message": self.message,
            "details": {"reason": self.reason, **self.details},
            "plugin": self.plugin,
            "timestamp": self.timestamp,
        }

    def to_dict(self) -> dict[str, Any]:
        """The wire form, with the traceback in `_internal`."""
        return {"error": self.public(), "_internal": {"traceback": self.traceback}}

    @classmethod
    def of(cls, document: Mapping[str, Any]) -> Envelope:
        """Read an envelope's wire form, or its public part alone (`error["error"]`).

        Whatever is missing or malformed reads as the host's own `internal`
        failure, so a reader never raises on a half-built envelope.
        """
        error = document.get("error", document)
        if not isinstance(error, Mapping):
            error = {}
        details = error.get("details")
        details = dict(details) if isinstance(details, Mapping) else {}
        reason = details.pop("reason", None)
        internal = document.get("_internal")
        plugin = error.get("plugin")
        return cls(
            reason=reason if isinstance(reason, str) else "internal",
            message=str(error.get("message", "")),
            plugin=plugin if isinstance(plugin, str) else None,
            details=details,
            traceback=str(internal.get("traceback", "")) if isinstance(internal, Mapping) else "",
            timestamp=str(error.get("timestamp", "")),
        )


def make_envelope(
    reason: str,
    message: str,
    *,
    plugin: str | None,
    details: Mapping[str, Any] | None = None,
    traceback: str = "",
) -> dict[str, Any]:
    """The wire form of `Envelope.build(...)`."""
    return Envelope.build(reason, message, plugin, details, traceback).to_dict()


def unknown_plugin_message(name: object) -> str:
    """What every layer says of a plugin name nobody registered."""
    return f"no plugin named {str(name)[:100]!r} is registered"


def unknown_plugin(name: object, available: Iterable[str] | None = None) -> Envelope:
    """The one `unknown_plugin` envelope, with up to 50 names that do exist."""
    details = {} if available is None else {"available": list(available)[:50]}
    return Envelope.build("unknown_plugin", unknown_plugin_message(name), details=details)
