"""The child's reply frames as the host reads them (runs in the host).

The frame format and its limits are `sandbox.protocol`'s; the models that
validate a frame's body live here, apart from it, because they need
pydantic: the launcher and every child import `sandbox.protocol`, and a
smaller launcher forks (and its children exit) faster.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from sandbox.jsonbounds import BoundsExceeded, NotJson, lone_surrogate, replace_surrogates, scan
from sandbox.outcome import CHILD_REASONS
from sandbox.protocol import REPLY_BOUNDS, FrameReader, ProtocolError, decode_json


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ReadyMessage(_Strict):
    type: Literal["ready"]


class ResultMessage(_Strict):
    type: Literal["result"]
    result: dict[str, Any]


class ErrorMessage(_Strict):
    type: Literal["error"]
    reason: str  # one of CHILD_REASONS, the reasons a child may report itself
    message: str
    exc_type: str
    traceback: str

    @field_validator("reason")
    @classmethod
    def _child_reason(cls, reason: str) -> str:
        if reason not in CHILD_REASONS:
            raise ValueError(f"a child may not report {reason[:40]!r}")
        return reason

    @field_validator("message", "exc_type", "traceback")
    @classmethod
    def _valid_text(cls, text: str) -> str:
        # A plugin's exception message may hold anything; an envelope must encode.
        return replace_surrogates(text)


def _invalid_output(problem: str) -> ErrorMessage:
    return ErrorMessage(
        type="error",
        reason="invalid_output",
        message=f"result {problem}",
        exc_type="InvalidOutput",
        traceback="",
    )


def _decode_bounded(body: bytes) -> Any:
    """Scan a frame from the child for its bounds, then decode it.

    Raises BoundsExceeded (for the caller to judge) or ProtocolError.
    """
    try:
        scan(body, REPLY_BOUNDS, members=True)
    except NotJson as exc:
        raise ProtocolError(f"frame is not valid JSON: {exc}") from exc
    return decode_json(body)


def parse_ready(body: bytes) -> None:
    """Check that the first frame is the ready marker."""
    try:
        ReadyMessage.model_validate(_decode_bounded(body))
    except (ValidationError, BoundsExceeded) as exc:
        raise ProtocolError("first frame is not the ready marker") from exc


def parse_reply(body: bytes) -> ResultMessage | ErrorMessage:
    """Parse the final frame. Raises ProtocolError for anything not allowed.

    A result frame whose result breaks the result rules of the module
    docstring comes back as an `invalid_output` ErrorMessage.
    """
    try:
        data = _decode_bounded(body)
    except BoundsExceeded as exc:
        if exc.where == "field 'result'":
            return _invalid_output(exc.problem)
        raise ProtocolError(f"reply {exc}") from exc
    kind = data.get("type") if isinstance(data, dict) else None
    model: type[ResultMessage] | type[ErrorMessage]
    if kind == "result":
        model = ResultMessage
    elif kind == "error":
        model = ErrorMessage
    else:
        raise ProtocolError(f"reply of type {str(kind)[:40]!r} is not allowed")
    try:
        message = model.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(f"malformed {kind} reply: {exc.error_count()} errors") from exc
    if isinstance(message, ResultMessage) and lone_surrogate(message.result):
        return _invalid_output("holds a lone surrogate, which is not valid UTF-8 text")
    return message


class ReplyStream:
    """The child's reply pipe as the protocol allows it: exactly one ready
    frame, then at most one final frame, then nothing."""

    def __init__(self, max_body: int) -> None:
        self._frames = FrameReader(max_body=max_body)
        self.ready = False
        self.final: bytes | None = None
        self.pending = 0  # bytes of an incomplete frame still buffered

    def feed(self, data: bytes) -> None:
        """Add bytes from the reply pipe. Raises ProtocolError for anything
        out of order: bytes after the final frame, a first frame that is not
        the ready marker, a second final frame, an oversized frame."""
        if self.final is not None:
            raise ProtocolError("bytes after the final frame")
        self._frames.feed(data)
        self.pending = self._frames.pending
        while self._frames.frames:
            frame = self._frames.frames.pop(0)
            if not self.ready:
                parse_ready(frame)
                self.ready = True
            elif self.final is None:
                self.final = frame
            else:
                raise ProtocolError("more than one final frame")
