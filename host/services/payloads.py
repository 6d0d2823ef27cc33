"""Analysis requests parsed from their raw bytes into bounded payloads.

    request body (one buffer)
      └─ jsonbounds.scan: the top-level members, and the caps on their values
         (depth, items, string length) checked on the raw bytes
           ├─ image: base64 decoded straight out of the buffer into bytes
           └─ plugin, mime_type, options: `json.loads` of their own spans only

Nothing is expanded into Python objects before its caps are checked, so a
body costs its own size plus the decoded image, whatever it holds. A body
that breaks a cap raises Rejected (`invalid_input`) naming the cap.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any

from host.errors import Rejected, envelope
from sandbox.jsonbounds import BoundsExceeded, JsonBounds, Member, NotJson, lone_surrogate, scan
from sandbox.tool_runner import ALLOWED_MIME_TYPES

FIELDS = ("plugin", "image", "mime_type", "options", "callback_url")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_BLANK = b" \t\n\r"
_NOT_ALPHABET = re.compile(r"[^A-Za-z0-9+/]")
_HINTS = {
    "-": " (URL-safe base64? send '+' and '/' rather than '-' and '_')",
    "_": " (URL-safe base64? send '+' and '/' rather than '-' and '_')",
    "=": " ('=' pads the end only)",
    "\n": " (send the base64 on one line, without line breaks)",
    "\r": " (send the base64 on one line, without line breaks)",
    " ": " (send the base64 without spaces)",
}


@dataclass
class AnalyzeBody:
    """A parsed analysis request: the image already decoded."""

    plugin: str | None
    image: bytes
    mime_type: str
    options: dict[str, Any] = field(default_factory=dict)
    callback_url: str | None = None  # POST /v1/jobs only (host/services/callbacks.py)

    def payload(self) -> dict[str, Any]:
        return {"image": self.image, "mime_type": self.mime_type, "options": self.options}


def option_bounds(max_depth: int, max_items: int, max_string_bytes: int) -> JsonBounds:
    """The caps on a request's `options`."""
    return JsonBounds(max_depth, max_items, max_string_bytes)


def _invalid(message: str) -> Rejected:
    return Rejected(envelope("invalid_input", message))


def _loads(data: bytes | bytearray, what: str) -> Any:
    try:
        return json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # the scan bounds depth; belt and braces
        raise _invalid(f"{what} is not valid JSON") from exc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode_image(buffer: bytearray, member: Member) -> bytes:
    """Decode the image's base64 text where it lies: no copy of the text."""
    start, end = member.start, member.end
    while start < end and buffer[start] in _BLANK:
        start += 1
    while end > start and buffer[end - 1] in _BLANK:
        end -= 1
    plain = (
        end - start >= 2
        and buffer[start] == buffer[end - 1] == ord('"')
        and buffer.find(b'"', start + 1, end - 1) == -1
        and buffer.find(b"\\", start + 1, end - 1) == -1
    )
    if plain:
        if _BASE64.fullmatch(buffer, start + 1, end - 1) is None:
            raise _not_base64(buffer[start + 1 : end - 1].decode("utf-8", "replace"))
        try:
            with memoryview(buffer) as view:
                return binascii.a2b_base64(view[start + 1 : end - 1])
        except binascii.Error as exc:
            raise _not_base64(buffer[start + 1 : end - 1].decode("ascii")) from exc
    text = _loads(buffer[start:end], "field 'image'")  # escapes such as \/: rare
    if not isinstance(text, str):
        raise _invalid("field 'image' must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _not_base64(text) from exc


def _not_base64(text: str) -> Rejected:
    return _invalid(f"field 'image' is not valid base64: {base64_problem(text)}")


def base64_problem(text: str) -> str:
    """What makes `text` no padded, standard-alphabet base64 (RFC 4648,
    section 4), in words a client can act on."""
    data = text.rstrip("=")
    # A C-speed search: a body of many MiB is refused in the time of one scan.
    bad = _NOT_ALPHABET.search(data)
    if bad is not None:
        char = bad[0]
        return f"{char!r} at offset {bad.start()} is not a base64 character" + _HINTS.get(char, "")
    padding = len(text) - len(data)
    if len(data) % 4 == 1:
        return (
            f"its length before any '=', {len(data)} characters, is one more than a "
            "multiple of 4, which no bytes encode: a character is missing or extra"
        )
    wanted = -len(data) % 4
    if padding == wanted:
        return "it does not decode"  # not reached: text that passes the checks above decodes
    if padding == 0:
        return (
            f"its length, {len(text)} characters, is not a multiple of 4: "
            f"the '=' padding is missing (add {wanted})"
        )
    return f"it ends in {padding} '=' where {wanted} belong"


def parse_analyze(buffer: bytearray, bounds: JsonBounds) -> AnalyzeBody:
    """Parse an analysis request body. Raises Rejected (invalid_input) naming
    the field or the cap that is wrong."""
    try:
        members = {m.key: m for m in scan(buffer, bounds, members=True)}  # last one wins
    except BoundsExceeded as exc:
        raise _invalid(str(exc)) from exc
    except NotJson as exc:
        raise _invalid(f"request body is not a valid JSON object: {exc}") from exc
    unknown = [name for name in members if name not in FIELDS]
    if unknown:
        shown = ", ".join(repr(name[:40]) for name in unknown[:5])
        raise _invalid(f"request body has unknown fields: {shown}")
    if "image" not in members:
        raise _invalid("field 'image' is missing")
    if "mime_type" not in members:
        raise _invalid("field 'mime_type' is missing")
    values = {
        name: _loads(buffer[m.start : m.end], f"field {name!r}")
        for name, m in members.items()
        if name != "image"
    }
    plugin, mime_type = values.get("plugin"), values["mime_type"]
    options = values.get("options", {})
    if plugin is not None and not isinstance(plugin, str):
        raise _invalid("field 'plugin' must be a string")
    if not isinstance(mime_type, str):
        raise _invalid("field 'mime_type' must be a string")
    if not isinstance(options, dict):
        raise _invalid("field 'options' must be an object")
    if lone_surrogate(options):
        raise _invalid("field 'options' holds a lone surrogate, which is not valid text")
    callback_url = values.get("callback_url")
    if callback_url is not None and not isinstance(callback_url, str):
        raise _invalid("field 'callback_url' must be a string")
    image = _decode_image(buffer, members["image"])
    return AnalyzeBody(plugin, image, mime_type, options, callback_url)


# The first bytes of each image type a call accepts (ALLOWED_MIME_TYPES), with its name.
_SIGNATURES: tuple[tuple[bytes, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png", "PNG"),
    (b"\xff\xd8\xff", "image/jpeg", "JPEG"),
    (b"GIF87a", "image/gif", "GIF"),
    (b"GIF89a", "image/gif", "GIF"),
    (b"BM", "image/bmp", "BMP"),
    (b"II*\x00", "image/tiff", "TIFF"),
    (b"MM\x00*", "image/tiff", "TIFF"),
    (b"II+\x00", "image/tiff", "TIFF"),  # BigTIFF
    (b"MM\x00+", "image/tiff", "TIFF"),
)


def sniff_image(image: bytes) -> tuple[str, str] | None:
    """The mime type and name of the image type `image` starts like (None: none known)."""
    for magic, mime_type, name in _SIGNATURES:
        if image.startswith(magic):
            return mime_type, name
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "image/webp", "WebP"
    return None


def check_image_type(image: bytes, mime_type: str, plugin: str | None = None) -> None:
    """Refuse an image whose bytes are not of the type `mime_type` names, or
    of no accepted type at all, before any plugin reads it. Raises Rejected
    (invalid_input) saying what the bytes are; `detected` in its details is
    the type they are (null: none accepted)."""
    found = sniff_image(image)
    if found is None:
        message = (
            f"the image's bytes are no known image format (first bytes {image[:8].hex(' ')}); "
            f"accepted: {', '.join(sorted(ALLOWED_MIME_TYPES))}"
        )
        raise Rejected(envelope("invalid_input", message, plugin, detected=None))
    detected, name = found
    if detected != mime_type:
        message = f"the image's bytes are {name}, but mime_type says {mime_type[:80]}"
        raise Rejected(envelope("invalid_input", message, plugin, detected=detected))


def parse_options(text: str, bounds: JsonBounds, what: str = "form field 'options'") -> Any:
    """Parse an options object given as JSON text, under `bounds`.

    Raises Rejected (invalid_input) naming the cap that is passed."""
    data = text.encode("utf-8", "surrogatepass")
    try:
        scan(data, bounds, name=what)
    except BoundsExceeded as exc:
        raise _invalid(str(exc)) from exc
    except NotJson as exc:
        raise _invalid(f"{what} is not a JSON object: {exc}") from exc
    options = _loads(data, what) if data.strip() else None
    if not isinstance(options, dict):
        raise _invalid(f"{what} is not a JSON object")
    if lone_surrogate(options):
        raise _invalid(f"{what} holds a lone surrogate, which is not valid text")
    return options


__all__ = [
    "ALLOWED_MIME_TYPES",
    "AnalyzeBody",
    "JsonBounds",
    "base64_problem",
    "check_image_type",
    "option_bounds",
    "parse_analyze",
    "parse_options",
    "sniff_image",
]
