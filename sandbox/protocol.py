"""The pipe protocol between the host and a sandbox child.

Every message is one frame: a 4-byte big-endian length, then that many
bytes of UTF-8 JSON. The reader checks the length against its maximum
before it reads a byte of the body, and decodes only strict JSON (no NaN,
no Infinity). Nothing a child writes is ever unpickled.

Host to child (a sealed in-memory file the child reads once)::

    frame  {"mime_type": str, "options": {...}, "image_size": int}
    bytes  the image, exactly image_size of them

Child to host (its reply pipe), in this order::

    {"type": "ready"}                  limits applied, plugin not imported yet
    {"type": "result", "result": {...}}
    {"type": "error", "reason": ..., "message": ..., "exc_type": ..., "traceback": ...}

Exactly one `ready` and one final frame; anything else is a protocol
violation. The plugin's stdout and stderr are separate pipes.

A reply is scanned for its bounds (`REPLY_BOUNDS`) before it is decoded, and
a result must be something the host's API can always serialise: at most
`RESULT_DEPTH` levels deep, no NaN or Infinity, string keys, and text that
is valid UTF-8 (JSON can spell a lone surrogate, `"\\ud800"`; UTF-8 cannot).
A result that breaks these rules is answered as the child itself answers a
result it cannot send: an `invalid_output` error reply. Text in an error
reply is made valid (lone surrogates become U+FFFD) instead.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from sandbox.jsonbounds import (
    BoundsExceeded,
    JsonBounds,
    NotJson,
    lone_surrogate,
    replace_surrogates,
    scan,
)
from sandbox.outcome import CHILD_REASONS

HEADER = struct.Struct(">I")
READY = {"type": "ready"}
# Far below what the API's serialisers survive (pydantic gives up near 255
# levels, and a job listing wraps a result in three more), and more than
# any real analysis needs.
RESULT_DEPTH = 32
# Per reply, besides the frame size limit: containers and commas, which bounds
# what decoding a reply of the maximum size can expand to.
RESULT_ITEMS = 100_000
REPLY_BOUNDS = JsonBounds(
    max_depth=RESULT_DEPTH, max_items=RESULT_ITEMS, max_string_bytes=sys.maxsize
)


class ProtocolError(Exception):
    """Bytes on the pipe that the protocol does not allow."""


def encode_frame(message: dict[str, Any]) -> bytes:
    """Serialise `message` as one frame. Raises ValueError for non-JSON data."""
    body = json.dumps(message, allow_nan=False, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e999" decodes to inf otherwise
        raise ValueError(f"{text[:20]} is out of range")
    return value


def decode_json(body: bytes) -> Any:
    """Decode strict JSON (no NaN, no Infinity, no out-of-range floats).

    Raises ProtocolError on anything else. Not bounded: scan first when the
    bytes come from a child (`parse_ready` and `parse_reply` do).
    """
    try:
        return json.loads(
            body.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"frame is not valid JSON: {type(exc).__name__}") from exc


class FrameReader:
    """Incremental frame parser for bytes arriving on a non-blocking pipe."""

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self._buffer = bytearray()
        self.frames: list[bytes] = []

    def feed(self, data: bytes) -> None:
        """Add bytes; completed frames land in `frames`.

        Raises ProtocolError as soon as a header announces more than the maximum.
        """
        self._buffer += data
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self._max_body:
                raise ProtocolError(
                    f"frame of {length} bytes announced, the limit is {self._max_body}"
                )
            if len(self._buffer) < HEADER.size + length:
                return
            self.frames.append(bytes(self._buffer[HEADER.size : HEADER.size + length]))
            del self._buffer[: HEADER.size + length]

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still buffered."""
        return len(self._buffer)


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
