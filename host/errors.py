"""Errors of the host's service layers, each carrying its envelope.

    ServiceError            (envelope: the SPEC section 5 envelope)
     ├── Rejected           the call or job was refused before it ran
     │                      (invalid input, unknown plugin, quarantined)
     ├── Overloaded         the queue is full (retry_after_s)
     ├── QuotaExceeded      the client keeps as many jobs or bytes as it may
     ├── JobNotFound        no job with that id
     ├── JobFinished        the job cannot be cancelled any more
     └── IdempotencyConflict the idempotency key was used for another request

Services raise these; the HTTP layer answers each with the status its reason
has in the reason table (`sandbox.outcome.REASONS`), in one place
(`host/api/errors.py`).
"""

from __future__ import annotations

import math
from typing import Any

from sandbox.envelope import Envelope
from sandbox.jsonbounds import replace_surrogates
from sandbox.outcome import reason_of


def envelope(
    reason: str, message: str, plugin: str | None = None, **details: Any
) -> dict[str, Any]:
    """The wire form of an envelope for `reason` (any reason of `sandbox.outcome.REASONS`)."""
    return Envelope.build(reason, message, plugin, details).to_dict()


def status_of(reason: str) -> int:
    """The HTTP status the API answers `reason` with (from the reason table)."""
    return reason_of(reason).http_status


def servable(value: Any, depth: int = 0) -> Any:
    """A copy of `value` that `json` serialises as UTF-8: lone surrogates
    replaced, NaN and Infinity as null, other objects as text, nesting cut."""
    if depth > 16:
        return "..."
    if isinstance(value, str):
        return replace_surrogates(value)
    if isinstance(value, dict):
        return {servable(str(k)): servable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [servable(v, depth + 1) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float):
        return value
    return replace_surrogates(str(value))


class ServiceError(Exception):
    """A service refused or failed; `envelope` says how."""

    def __init__(self, envelope: dict[str, Any]) -> None:
        super().__init__(envelope["error"]["message"])
        self.envelope = envelope

    @property
    def reason(self) -> str:
        return Envelope.of(self.envelope).reason


class Rejected(ServiceError):
    """Refused before running: invalid input, unknown plugin, quarantine."""


class Overloaded(ServiceError):
    """Every worker is busy and the queue is full."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(
            envelope(
                "overloaded", "the host is saturated; retry later", retry_after_s=retry_after_s
            )
        )


class ShuttingDown(ServiceError):
    """The host is shutting down: the job did not run (and takes no new one)."""

    def __init__(self, message: str) -> None:
        super().__init__(envelope("shutting_down", message))


class QuotaExceeded(ServiceError):
    """The client already stores as many jobs, or bytes, as its quota allows."""

    def __init__(self, quota: str, limit: int, used: int, retry_after_s: float) -> None:
        super().__init__(
            envelope(
                "quota_exceeded",
                f"quota {quota} ({limit}) reached: {used} in use; finished jobs "
                "count until they age out",
                quota=quota,
                limit=limit,
                used=used,
                retry_after_s=retry_after_s,
            )
        )


class JobNotFound(ServiceError):
    def __init__(self, job_id: str) -> None:
        super().__init__(envelope("unknown_job", f"no job with id {job_id[:80]!r}"))


class JobFinished(ServiceError):
    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(
            envelope("job_finished", f"job {job_id} is {status} already", status=status)
        )


class IdempotencyConflict(ServiceError):
    """The client's idempotency key holds a job created by a different request."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            envelope(
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request (plugin, image, "
                "mime_type or options); use a new key for a new request",
                key=key,
                job_id=job_id,
            )
        )


__all__ = [
    "Envelope",
    "IdempotencyConflict",
    "JobFinished",
    "JobNotFound",
    "Overloaded",
    "QuotaExceeded",
    "Rejected",
    "ServiceError",
    "ShuttingDown",
    "envelope",
    "servable",
    "status_of",
]
