"""The pipe protocol: frames are size-checked before their body, and only
strict JSON of the allowed shapes is accepted."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.call import ErrorMessage, ResultMessage, parse_ready, parse_reply
from sandbox.envelope import make_envelope
from sandbox.protocol import (
    RESULT_DEPTH,
    RESULT_ITEMS,
    FrameReader,
    ProtocolError,
    encode_frame,
)

ROOT = Path(__file__).resolve().parents[2]


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


def nested_result(levels: int) -> bytes:
    return b'{"type":"result","result":' + b'{"a":' * (levels - 1) + b"{}" + b"}" * levels


def test_result_within_the_depth_cap_is_accepted() -> None:
    reply = parse_reply(nested_result(RESULT_DEPTH))
    assert isinstance(reply, ResultMessage)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (nested_result(RESULT_DEPTH + 1), f"nests deeper than {RESULT_DEPTH} levels"),
        (nested_result(255), f"nests deeper than {RESULT_DEPTH} levels"),
        (nested_result(100_000), f"nests deeper than {RESULT_DEPTH} levels"),
        (
            b'{"type":"result","result":{"x":[' + b"[]," * RESULT_ITEMS + b"[]]}}",
            f"more than {RESULT_ITEMS} items",
        ),
        (b'{"type":"result","result":{"s":"bad \\ud800"}}', "lone surrogate"),
        (b'{"type":"result","result":{"\\udfff":1}}', "lone surrogate"),
        (b'{"type":"result","result":{"s":["\\ude00\\ud83d"]}}', "lone surrogate"),
    ],
)
def test_result_the_api_could_not_serve_is_invalid_output(body: bytes, problem: str) -> None:
    reply = parse_reply(body)
    assert isinstance(reply, ErrorMessage) and reply.reason == "invalid_output"
    assert problem in reply.message


def test_surrogate_pair_is_text_and_accepted() -> None:
    reply = parse_reply(b'{"type":"result","result":{"s":"\\ud83d\\ude00"}}')
    assert isinstance(reply, ResultMessage) and reply.result == {"s": "\U0001f600"}


def test_error_reply_text_is_made_valid_utf8() -> None:
    reply = parse_reply(
        b'{"type":"error","reason":"plugin_raised","message":"kaboom \\udc80",'
        b'"exc_type":"E\\ud800","traceback":"\\udfff"}'
    )
    assert isinstance(reply, ErrorMessage)
    assert (reply.message, reply.exc_type, reply.traceback) == (
        "kaboom \ufffd",
        "E\ufffd",
        "\ufffd",
    )
    envelope = make_envelope(reply.reason, reply.message, plugin="p", traceback=reply.traceback)
    json.dumps(envelope, ensure_ascii=False).encode("utf-8")  # raises if any surrogate is left


def test_the_payload_file_is_sealed_and_reads_back_as_written() -> None:
    import fcntl
    import os

    from sandbox.protocol import Payload, read_payload, write_payload

    fd = write_payload(Payload(b"\x89PNG-bytes", "image/png", {"k": [1, 2]}))
    try:
        with pytest.raises(PermissionError):
            os.write(fd, b"changed")  # F_SEAL_WRITE
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)  # F_SEAL_SHRINK
        copy = os.dup(fd)
    finally:
        os.close(fd)
    assert fcntl.fcntl(copy, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SEAL
    assert read_payload(copy) == Payload(b"\x89PNG-bytes", "image/png", {"k": [1, 2]})


def test_an_unsealed_payload_file_is_refused() -> None:
    import os

    from sandbox.protocol import read_payload

    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.write(fd, encode_frame({"mime_type": "image/png", "options": {}, "image_size": 0}))
    os.lseek(fd, 0, os.SEEK_SET)
    with pytest.raises(ProtocolError, match="not sealed"):
        read_payload(fd)


def test_launcher_requests_round_trip_and_unknown_ones_are_refused() -> None:
    from sandbox.limits import HostLimits, PluginLimits
    from sandbox.protocol import (
        ChildSpec,
        KillCall,
        KillUid,
        StartChild,
        StopUid,
        decode_request,
        encode_request,
    )

    spec = ChildSpec(
        plugin_dir="/p",
        entrypoint="m:C",
        limits=HostLimits().clamp(PluginLimits()),
        layers={"seccomp": True},
        expose=("/usr", "/p"),
        scratch=None,
        uid=1700001,
        gid=1700001,
        cgroup_procs=("/sys/fs/cgroup/pids/plughost/call-x/cgroup.procs",),
        warm=False,
        token="t" * 32,
    )
    for request in (StartChild(spec), KillCall("abc"), KillUid(1700002), StopUid(1700003)):
        assert decode_request(encode_request(request)) == request
    with pytest.raises(ProtocolError, match="unknown launcher request"):
        decode_request(json.dumps({"op": "fork_bomb"}).encode())
    with pytest.raises(ProtocolError, match="malformed child spec"):
        decode_request(json.dumps({"op": "start", "spec": {"uid": 0}}).encode())


def test_the_reply_stream_takes_one_ready_frame_then_one_final_frame() -> None:
    from sandbox.call import ReplyStream
    from sandbox.protocol import READY

    stream = ReplyStream(max_body=1024)
    final = encode_frame({"type": "result", "result": {}})
    stream.feed(encode_frame(READY) + final[:3])
    assert stream.ready and stream.final is None and stream.pending == 3
    stream.feed(final[3:])
    assert stream.final == final[4:] and stream.pending == 0
    with pytest.raises(ProtocolError, match="after the final frame"):
        stream.feed(b"x")
    twice = ReplyStream(max_body=1024)
    with pytest.raises(ProtocolError, match="more than one final frame"):
        twice.feed(encode_frame(READY) + final + final)
    with pytest.raises(ProtocolError, match="ready marker"):
        ReplyStream(max_body=1024).feed(final)


@pytest.mark.timeout(60)
def test_the_launcher_loads_neither_pydantic_nor_the_hosts_watch() -> None:
    # Every call forks the launcher and every exit frees what it copied: the
    # reply models (pydantic) and the watch live in sandbox.call, which only
    # the host imports. Nor threading, whose at-fork handler would run first
    # thing in every child (0.3-0.5 ms of copied pages each).
    probe = (
        "import sys; sys.argv = ['launcher']\n"
        "import sandbox.launcher, sandbox.child, sandbox.inherited\n"
        "from sandbox.protocol import CallLimits, ChildSpec\n"
        "limits = CallLimits(5, 128, 8, 64, 8, 1 << 20, 1 << 20, 16)\n"
        "sandbox.inherited.prepare(ChildSpec('/srv/p', 'p:P', limits, {'landlock': True},\n"
        "    ('/srv/p',), None, 2000, 2000, (), False, 't'))\n"
        "unwanted = ('pydantic', 'psutil', 'sandbox.call', 'sandbox.supervisor', 'threading')\n"
        "print(sorted(n for n in unwanted if n in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=50, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.timeout(60)
def test_the_host_loads_neither_the_launcher_nor_the_childs_code() -> None:
    # The host starts the launcher by the path of its source
    # (sandbox.launcher_client): the launcher's loop, what it prepares for
    # its children (sandbox.inherited) and the child's steps are never the
    # host's code.
    probe = (
        "import sys\n"
        "import host.cli, host.api.app\n"
        "from sandbox import Sandbox\n"
        "import sandbox.tool_runner\n"
        "import sandbox.supervisor, sandbox.launcher_client\n"
        "own = ('sandbox.launcher', 'sandbox.inherited', 'sandbox.child')\n"
        "print(sorted(n for n in own if n in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=50, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
