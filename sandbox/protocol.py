"""Every message that crosses a process boundary, one definition each.

    host     -- CallSpec ---------------------------------> (in-process input)
    host     -- LauncherRequest (SEQPACKET, JSON) ---------> launcher
                   StartChild(ChildSpec) + 5 descriptors
                   KillCall(token) / KillUid(uid) + 1 descriptor
                   StopUid(uid) + 2 descriptors (a warm child's call, stopped)
    launcher -- status pipe: PID, then EXIT ---------------> host
    launcher -- ChildSpec (in memory, after fork) ---------> child
    host     -- payload file (sealed memfd) ---------------> child
    child    -- reply pipe: ready frame, final frame ------> host
    child    -- exit code SETUP_FAILED / REPLY_OUT_OF_MEMORY -> host

Every reply message is one frame: a 4-byte big-endian length, then that many
bytes of UTF-8 JSON. The reader checks the length against its maximum
before it reads a byte of the body, and decodes only strict JSON (no NaN,
no Infinity). Nothing a child writes is ever unpickled.

Host to child, the payload file: an in-memory file (memfd) the host writes
once and then seals against any write, growth or shrinking (F_SEAL_*), so
what the child reads is what the host wrote; the child checks the seals
before it reads::

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

import fcntl
import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from sandbox.jsonbounds import (
    JsonBounds,
)
from sandbox.limits import CallLimits

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
    body = _ENCODER.encode(message).encode()
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
        return _DECODER.decode(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"frame is not valid JSON: {type(exc).__name__}") from exc


# Made once: json.dumps and json.loads make a new encoder or decoder on every
# call that passes an option.
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


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


# -- the call: what the host asks the sandbox to run --------------------------


@dataclass(frozen=True)
class Payload:
    """What the plugin's `run` gets, and the payload file carries."""

    image: bytes
    mime_type: str
    options: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"image": self.image, "mime_type": self.mime_type, "options": self.options}


@dataclass(frozen=True)
class CallSpec:
    """Everything the sandbox needs for one call."""

    plugin: str
    plugin_dir: str
    entrypoint: str
    limits: CallLimits
    image: bytes
    mime_type: str
    options: dict[str, Any]
    # The plugin's own environment (its declared packages), searched after
    # its directory; the host's site-packages never are.
    import_paths: tuple[str, ...] = ()
    # Where the entrypoint's module is imported from, when not plugin_dir: the
    # parent of an installed plugin package (only plugin_dir itself is exposed).
    import_root: str | None = None

    def without_payload(self) -> CallSpec:
        """The same plugin and limits, no payload (what a warm child is started for)."""
        return replace(self, image=b"", mime_type="", options={})


# -- the payload file -----------------------------------------------------------

PAYLOAD_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def write_payload(payload: Payload) -> int:
    """Write `payload` into a new memfd and seal it; return the descriptor
    (close-on-exec; the caller closes it). Its readers read it at offsets
    (`read_payload`), so it is not rewound."""
    header = {
        "mime_type": payload.mime_type,
        "options": payload.options,
        "image_size": len(payload.image),
    }
    fd = os.memfd_create("plughost-payload", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        # One writev for the header and the image (it may write less: the rest follows).
        parts = [memoryview(encode_frame(header)), memoryview(payload.image)]
        while parts:
            written = os.writev(fd, parts)
            while parts and written >= len(parts[0]):
                written -= len(parts.pop(0))
            if parts:
                parts[0] = parts[0][written:]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, PAYLOAD_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_payload(fd: int) -> Payload:
    """Read the payload file on `fd` (and close it). Raises ProtocolError if
    it is not sealed or not what `write_payload` writes."""
    try:
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & PAYLOAD_SEALS != PAYLOAD_SEALS:
            raise ProtocolError("the payload file is not sealed")
        (length,) = HEADER.unpack(_pread_all(fd, HEADER.size, 0))
        header = decode_json(_pread_all(fd, length, HEADER.size))
        if not isinstance(header, dict) or set(header) != {"mime_type", "options", "image_size"}:
            raise ProtocolError("the payload file's header is malformed")
        image = _pread_all(fd, header["image_size"], HEADER.size + length)
    finally:
        os.close(fd)
    return Payload(image, header["mime_type"], header["options"])


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes of the file at `offset`, fewer only where the file ends."""
    parts = []
    got = 0
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


# -- the child: what the launcher forks, and how it ends ---------------------------

# The environment of the launcher and of every child: nothing of the host's.
SAFE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

# Exit codes of a child that did not reply: its setup failed (the plugin never
# ran), or it ran out of memory writing its reply.
SETUP_FAILED = 121
REPLY_OUT_OF_MEMORY = 122


@dataclass(frozen=True)
class ChildSpec:
    """What a child needs to set itself up and run the plugin.

    Built by the host (`ChildHandle.start`), carried to the launcher in a
    StartChild request, completed there with `launcher_pid`, and read by the
    child after the fork.
    """

    plugin_dir: str
    entrypoint: str
    limits: CallLimits
    layers: dict[str, bool]  # the optional layers this call gets (sandbox.layers)
    expose: tuple[str, ...]  # host paths the child may read
    scratch: str | None  # host scratch directory (None: a tmpfs in the minimal root)
    uid: int | None  # the call's own uid on a root host
    gid: int | None
    cgroup_procs: tuple[str, ...]  # cgroup.procs files the child joins first
    warm: bool  # set up, then wait for the payload on a socket
    token: str  # the launcher's name for this child (KillCall)
    launcher_pid: int = 0
    hide: tuple[str, ...] = ()  # package directories inside `expose` covered by an empty tmpfs
    import_paths: tuple[str, ...] = ()  # the plugin's environment, after its directory
    import_root: str | None = None  # sys.path entry of an installed plugin package
    given: tuple[str, ...] = ()  # namespaces the launcher gave it (sandbox.layers.shared)
    memory_counted: bool = False  # a memory cgroup counts the call's pages

    def to_wire(self) -> dict[str, Any]:
        wire = {name: getattr(self, name) for name in self.__dataclass_fields__}
        wire["limits"] = self.limits.__dict__
        return wire

    @classmethod
    def from_wire(cls, wire: Any) -> ChildSpec:
        """Raises ProtocolError naming what is wrong."""
        if not isinstance(wire, dict) or set(wire) != set(cls.__dataclass_fields__):
            raise ProtocolError("malformed child spec")
        try:
            limits = CallLimits(**wire["limits"])
        except TypeError as exc:
            raise ProtocolError(f"malformed limits in child spec: {exc}") from exc
        return cls(
            **{
                **wire,
                "limits": limits,
                "expose": tuple(wire["expose"]),
                "hide": tuple(wire["hide"]),
                "import_paths": tuple(wire["import_paths"]),
                "cgroup_procs": tuple(wire["cgroup_procs"]),
                "given": tuple(wire["given"]),
            }
        )


# -- the launcher: requests and replies ------------------------------------------

# Descriptors that come with a StartChild request, in this order.
CHILD_FDS = ("status", "reply", "stdout", "stderr", "payload")
MAX_REQUEST = 1 << 16
PID = struct.Struct(">q")  # first on the status pipe: the child's pid
EXIT = struct.Struct(">iq")  # then: its raw wait status, peak RSS in KiB
# A PID namespace's init (or relay) to the launcher, as soon as the plugin's
# process has exited: its raw wait status and peak RSS in KiB.
RELAYED_STATUS = struct.Struct(">iq")


@dataclass(frozen=True)
class StartChild:
    """Fork a child for `spec`; comes with the descriptors of CHILD_FDS."""

    spec: ChildSpec


@dataclass(frozen=True)
class KillCall:
    """SIGKILL the child started with this token, unless it is reaped."""

    token: str


@dataclass(frozen=True)
class KillUid:
    """Kill every process of `uid`; comes with one descriptor for the EXIT."""

    uid: int


@dataclass(frozen=True)
class StopUid:
    """Stop every process of `uid` until the host continues them; comes with
    two descriptors: where the launcher's stopper answers b"1" (all stopped)
    or b"0", and where the host's one byte has it continue them."""

    uid: int


LauncherRequest = StartChild | KillCall | KillUid | StopUid


@dataclass(frozen=True)
class ChildExit:
    """What the launcher reports when it has reaped a child."""

    status: int  # raw wait status
    maxrss_kb: int = field(default=0)


def encode_request(request: LauncherRequest) -> bytes:
    if isinstance(request, StartChild):
        body: dict[str, Any] = {"op": "start", "spec": request.spec.to_wire()}
    elif isinstance(request, KillCall):
        body = {"op": "kill_call", "token": request.token}
    elif isinstance(request, KillUid):
        body = {"op": "kill_uid", "uid": request.uid}
    else:
        body = {"op": "stop_uid", "uid": request.uid}
    return json.dumps(body).encode()


def decode_request(message: bytes) -> LauncherRequest:
    """Raises ProtocolError for a request the launcher does not know."""
    data = decode_json(message)
    op = data.get("op") if isinstance(data, dict) else None
    if op == "start":
        return StartChild(ChildSpec.from_wire(data.get("spec")))
    if op == "kill_call" and isinstance(data.get("token"), str):
        return KillCall(data["token"])
    if op == "kill_uid" and isinstance(data.get("uid"), int):
        return KillUid(data["uid"])
    if op == "stop_uid" and isinstance(data.get("uid"), int):
        return StopUid(data["uid"])
    raise ProtocolError(f"unknown launcher request {str(op)[:40]!r}")
