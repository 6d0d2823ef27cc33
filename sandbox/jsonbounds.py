"""Bounds on JSON text, checked on the raw bytes before anything is expanded (host).

Decoding JSON turns a few bytes into large Python objects: `{}` is 2 bytes
of text and about 64 bytes of dict, so a body of empty objects grows some
thirty times, and a deep enough nesting exhausts the interpreter's stack.
`scan` walks the bytes once (a regular expression finds strings and
structural characters; numbers and literals are skipped) and raises
`BoundsExceeded` as soon as a cap is passed, so a hostile document costs
no more than reading it.

    BoundsError (ValueError)
     ├── NotJson          the text cannot be JSON (syntax the scan can see)
     └── BoundsExceeded   a cap was passed: `limit` ("depth", "items",
                          "string", "plain"), `bound`, `where`

`scan` is not a validator: text that passes still goes through `json.loads`.
`lone_surrogate` finds what strict UTF-8 cannot encode in decoded values.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# A whole string (escapes skipped in pairs), a structural character, or a
# quote that opens a string never closed.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\],:]|"', re.DOTALL)
_SPACE = re.compile(rb"[ \t\n\r]*")
# Long top-level strings must be plain printable ASCII (an escaped "/" aside),
# so that decoding them costs one byte per byte.
_PLAIN = re.compile(rb'"[\x20\x21\x23-\x5b\x5d-\x7e]*(?:\\/[\x20\x21\x23-\x5b\x5d-\x7e]*)*"')
_SURROGATE = re.compile("[\ud800-\udfff]")
_QUOTE, _COMMA, _BRACE = ord('"'), ord(","), ord("{")
_OPEN, _CLOSE = frozenset(b"{["), frozenset(b"}]")


@dataclass(frozen=True)
class JsonBounds:
    """Caps on one JSON value.

    max_depth: containers inside containers; `{}` is 1 deep, `{"a": []}` 2.
    max_items: containers opened plus commas, in total: about the number of
        values, so `[{}, {}]` counts 4.
    max_string_bytes: longest string or key inside a container, as raw text.
    """

    max_depth: int
    max_items: int
    max_string_bytes: int


class BoundsError(ValueError):
    """The bytes are not a JSON document within the bounds."""


class NotJson(BoundsError):
    """Syntax the scan can already tell is not JSON."""


class BoundsExceeded(BoundsError):
    """A cap was passed; `where` names the top-level member or the value."""

    def __init__(self, limit: str, bound: int, where: str) -> None:
        self.limit = limit
        self.bound = bound
        self.where = where
        self.problem = {
            "depth": f"nests deeper than {bound} levels",
            "items": f"has more than {bound} items",
            "string": f"has a string longer than {bound} bytes",
            "plain": f"is a string over {bound} bytes that is not plain ASCII text",
        }[limit]
        super().__init__(f"{where} {self.problem}")


@dataclass(frozen=True)
class Member:
    """One member of a top-level object: its key and the span of its raw value."""

    key: str
    start: int
    end: int


def scan(
    data: bytes | bytearray, bounds: JsonBounds, members: bool = False, name: str = "the value"
) -> list[Member]:
    """Check `data` against `bounds` in one pass; return the top-level members.

    With `members`, `data` must be one JSON object and the caps apply to each
    member's value (so `max_depth` counts from the member, not the document);
    the members are returned with the spans of their values, and a member's
    string value longer than `max_string_bytes` must be plain ASCII text.
    Without, the caps apply to the whole value, named `name` in errors, and
    the list is empty. Items are counted over the whole document.

    Raises NotJson or BoundsExceeded. Passing says nothing about numbers,
    literals or escapes: decode the text afterwards with a strict parser.
    """
    return _Scanner(data, bounds, members, name).members_found()


def surely_within(data: bytes | bytearray, bounds: JsonBounds) -> bool:
    """True when `data` cannot pass a cap of `bounds`, whatever it holds, as
    `scan` counts them (with or without members): its depth is at most the
    bytes that open a container, its items those and its commas, a string
    at most its length. Counted in C, a pass per byte class: a small reply
    needs no scan. False says nothing; `scan` then decides."""
    if len(data) > bounds.max_string_bytes:
        return False
    opened = data.count(b"{") + data.count(b"[")
    return opened <= bounds.max_depth and opened + data.count(b",") <= bounds.max_items


class _Scanner:
    """One pass of `scan` over the tokens of a document."""

    def __init__(
        self, data: bytes | bytearray, bounds: JsonBounds, members: bool, name: str
    ) -> None:
        self.data, self.bounds, self.members = data, bounds, members
        self.base = 1 if members else 0
        self.found: list[Member] = []
        self.depth = self.items = 0
        self.where = name
        self.expect = "open" if members else ""  # members: open, key, colon, value
        self.value_at = self.last_end = 0
        self.key = ""

    def members_found(self) -> list[Member]:
        data = self.data
        for match in _TOKEN.finditer(data):
            start, end = match.span()
            char = data[start]
            if self.members and self.depth <= 1:
                if self.depth == 0 and char != _BRACE:
                    raise NotJson("the document is not one JSON object")
                _gap(data, self.last_end, start, self.expect)
            if char == _QUOTE:
                self._string(start, end)
            elif char in _OPEN:
                self._open()
            elif char in _CLOSE:
                if self._close(start, end):
                    return self.found
            elif char == _COMMA:
                self._comma(start)
            elif self.members and self.depth == 1:  # a colon
                if self.expect != "colon":
                    raise NotJson("a colon where none belongs")
                self.expect, self.value_at = "value", end
            self.last_end = end
        if self.depth or self.members:
            raise NotJson("the document ends before it is complete")
        return self.found

    def _count_item(self) -> None:
        self.items += 1
        if self.items > self.bounds.max_items:
            raise BoundsExceeded("items", self.bounds.max_items, self.where)

    def _string(self, start: int, end: int) -> None:
        if end - start == 1:
            raise NotJson("a string is never closed")
        longest = self.bounds.max_string_bytes
        if self.depth > self.base and end - start - 2 > longest:
            raise BoundsExceeded("string", longest, self.where)
        if self.members and self.depth == 1:
            if self.expect == "key":
                self.key = _key(self.data, start, end)
                self.where, self.expect = f"field {self.key!r}", "colon"
            elif self.expect != "value":
                raise NotJson("a string where a colon should be")
            elif end - start - 2 > longest and not _PLAIN.fullmatch(self.data, start, end):
                raise BoundsExceeded("plain", longest, self.where)

    def _open(self) -> None:
        self.depth += 1
        if self.members and self.depth == 1:
            if self.expect != "open":
                raise NotJson("the document is not one JSON object")
            self.expect = "key"
        elif self.depth > self.base:
            if self.depth - self.base > self.bounds.max_depth:
                raise BoundsExceeded("depth", self.bounds.max_depth, self.where)
            self._count_item()

    def _close(self, start: int, end: int) -> bool:
        """True at the end of a member-mode document."""
        self.depth -= 1
        if self.depth < 0:
            raise NotJson("a bracket is closed that was never opened")
        if not (self.members and self.depth == 0):
            return False
        if self.expect == "value":
            self.found.append(Member(self.key, self.value_at, start))
        elif self.expect == "key" and self.found:
            raise NotJson("a comma before the closing brace")
        elif self.expect == "colon":
            raise NotJson(f"member {self.where} has no value")
        if self.data[start] != ord("}") or _SPACE.fullmatch(self.data, end) is None:
            raise NotJson("the document is not one JSON object")
        return True

    def _comma(self, start: int) -> None:
        if self.members and self.depth == 1:
            if self.expect != "value":
                raise NotJson("a comma where a member should be")
            self.found.append(Member(self.key, self.value_at, start))
            self.expect = "key"
        elif self.depth > self.base:
            self._count_item()


def _gap(data: bytes | bytearray, start: int, end: int, expect: str) -> None:
    """Between the structural tokens of a top-level object only blanks may stand."""
    if expect != "value" and _SPACE.fullmatch(data, start, end) is None:
        raise NotJson("the document is not one JSON object")


def _key(data: bytes | bytearray, start: int, end: int) -> str:
    try:
        key = json.loads(data[start:end])
    except ValueError as exc:
        raise NotJson("a member name is not a valid string") from exc
    assert isinstance(key, str)
    return key


def lone_surrogate(value: Any, depth: int = 0) -> bool:
    """True if a string or key anywhere in the decoded `value` holds a surrogate
    code point, which UTF-8 cannot encode (JSON text can: `"\\ud800"`).

    Recursive: call it only on values whose depth a scan has bounded.
    """
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(
            lone_surrogate(k, depth) or lone_surrogate(v, depth + 1) for k, v in value.items()
        )
    if isinstance(value, list):
        return any(lone_surrogate(v, depth + 1) for v in value)
    return False


def replace_surrogates(text: str) -> str:
    """`text` with every surrogate code point replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


__all__ = [
    "BoundsError",
    "BoundsExceeded",
    "JsonBounds",
    "Member",
    "NotJson",
    "lone_surrogate",
    "replace_surrogates",
    "scan",
]
