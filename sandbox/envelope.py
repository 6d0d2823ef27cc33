"""The structured error envelope every failed call is answered with (SPEC section 5)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sandbox.jsonbounds import replace_surrogates
from sandbox.outcome import REASONS


def make_envelope(
    reason: str,
    message: str,
    *,
    plugin: str | None,
    details: dict[str, Any] | None = None,
    traceback: str = "",
    error_type: str | None = None,
) -> dict[str, Any]:
    """Build the envelope for `reason`; its error type comes from `REASONS`
    unless `error_type` is given (for reasons the host layers add).

    `message` is cut to one line and made valid UTF-8 text (it may come from a
    plugin); `traceback` goes to `_internal` only.
    """
    error_type = error_type or REASONS[reason][0]
    line = replace_surrogates((message.splitlines() or [""])[0][:500]) or reason
    return {
        "error": {
            "type": error_type,
            "message": line,
            "details": {"reason": reason, **(details or {})},
            "plugin": plugin,
            "timestamp": datetime.now(UTC).isoformat(),
        },
        "_internal": {"traceback": traceback},
    }


def public_error(envelope: dict[str, Any]) -> dict[str, Any]:
    """The part of an envelope that may leave the host (no `_internal`)."""
    return dict(envelope["error"])
