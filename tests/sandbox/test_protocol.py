"""The pipe protocol: frames are size-checked before their body, and only
strict JSON of the allowed shapes is accepted."""

from __future__ import annotations

import pickle
import struct

import pytest

from sandbox.protocol import (
    ErrorMessage,
    FrameReader,
    ProtocolError,
    ResultMessage,
    encode_frame,
    parse_ready,
    parse_reply,
)


def test_frames_round_trip_in_any_chunking() -> None:
    data = encode_frame({"type": "ready"}) + encode_frame({"type": "result", "result": {"a": 1}})
    reader = FrameReader(max_body=1024)
    for i in range(len(data)):
        reader.feed(data[i : i + 1])
    assert len(reader.frames) == 2 and reader.pending == 0
    parse_ready(reader.frames[0])
    reply = parse_reply(reader.frames[1])
    assert isinstance(reply, ResultMessage) and reply.result == {"a": 1}


def test_oversized_header_is_refused_before_the_body_arrives() -> None:
    reader = FrameReader(max_body=100)
    with pytest.raises(ProtocolError, match="101 bytes announced"):
        reader.feed(struct.pack(">I", 101))


def test_error_reply_is_parsed() -> None:
    body = encode_frame(
        {
            "type": "error",
            "reason": "plugin_raised",
            "message": "m",
            "exc_type": "E",
            "traceback": "",
        }
    )[4:]
    reply = parse_reply(body)
    assert isinstance(reply, ErrorMessage) and reply.reason == "plugin_raised"


@pytest.mark.parametrize(
    "body",
    [
        pickle.dumps({"type": "result", "result": {}}),
        b'{"type": "result", "result": {"x": NaN}}',
        b'{"type": "result", "result": {"x": 1e999}}',
        b'{"type": "result", "result": [1]}',
        b'{"type": "result", "result": {}, "extra": 1}',
        b'{"type": "error", "reason": "timeout", "message": "", "exc_type": "", "traceback": ""}',
        b'{"type": "ready"}',
        b'"just a string"',
        b"[" * 100000 + b"]" * 100000,
        b"\xff\xfe",
    ],
)
def test_reply_that_the_protocol_does_not_allow_is_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_reply(body)


def test_non_json_values_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        encode_frame({"x": float("inf")})
