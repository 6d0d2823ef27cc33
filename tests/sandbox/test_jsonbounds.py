"""The one-pass bounds scan: caps are found on the raw bytes, before decoding,
and structure that cannot be one JSON object is refused."""

from __future__ import annotations

import json
import time

import pytest

from sandbox.jsonbounds import (
    BoundsExceeded,
    JsonBounds,
    NotJson,
    lone_surrogate,
    scan,
    surely_within,
)

BOUNDS = JsonBounds(max_depth=4, max_items=20, max_string_bytes=8)


def test_members_are_found_with_the_spans_of_their_values() -> None:
    data = b' {"a": 1, "b" : {"c": [1, "x"]}, "d":"a\\"b"} '
    members = scan(data, BOUNDS, members=True)
    assert [m.key for m in members] == ["a", "b", "d"]
    assert [json.loads(data[m.start : m.end]) for m in members] == [1, {"c": [1, "x"]}, 'a"b']


@pytest.mark.parametrize(
    ("data", "limit"),
    [
        (b'{"o": [[[[[]]]]]}', "depth"),
        (b'{"o": [' + b"1," * 20 + b"1]}", "items"),
        (b'{"o": {"k": "123456789"}}', "string"),
        (b'{"o": {"123456789": 1}}', "string"),
        (b'{"image": "abc\\u00e9defghij"}', "plain"),
    ],
)
def test_each_cap_is_reported_with_the_member_it_was_passed_in(data: bytes, limit: str) -> None:
    with pytest.raises(BoundsExceeded) as caught:
        scan(data, BOUNDS, members=True)
    assert caught.value.limit == limit and caught.value.where.startswith("field ")


def test_long_plain_top_level_strings_are_allowed() -> None:
    assert scan(b'{"image": "' + b"A" * 1000 + b'"}', BOUNDS, members=True)[0].key == "image"


def test_a_value_is_capped_from_its_own_outermost_container() -> None:
    scan(b"[[[[]]]]", BOUNDS)
    with pytest.raises(BoundsExceeded, match="options nests deeper than 4 levels"):
        scan(b"[[[[[]]]]]", BOUNDS, name="options")


@pytest.mark.parametrize(
    "data",
    [
        b"[]",
        b"{} {}",
        b',{"a": 1}',
        b'{"a": 1,}',
        b'{"a" "b": 1}',
        b'{"a": 1 "b": 2}',
        b"{1: 2}",
        b'{"a": 1',
        b'{"a": "x',
        b"{}}",
    ],
)
def test_what_cannot_be_one_json_object_is_refused(data: bytes) -> None:
    with pytest.raises(NotJson):
        scan(data, BOUNDS, members=True)


def test_a_flood_stops_at_the_cap_without_reading_on() -> None:
    bounds = JsonBounds(max_depth=16, max_items=10_000, max_string_bytes=65_536)
    data = b'{"options": {"x": [' + b"{}," * 3_000_000 + b"{}]}}"
    started = time.process_time()
    with pytest.raises(BoundsExceeded, match="more than 10000 items"):
        scan(data, bounds, members=True)
    # Printed, not asserted: a figure, not a timed test.
    print(f"refused a {len(data) / 1e6:.0f} MB flood in {time.process_time() - started:.4f} s")


def test_lone_surrogates_are_found_in_keys_and_values() -> None:
    assert lone_surrogate({"a": ["\ud800"]}) and lone_surrogate({"\udfff": 1})
    assert not lone_surrogate({"a": ["\U0001f600", 1, None, 2.5]})


@pytest.mark.parametrize(
    "data",
    [
        b'{"o": [[[[[]]]]]}',
        b'{"o": [' + b"1," * 20 + b"1]}",
        b'{"o": {"k": "123456789"}}',
        b'{"image": "abc\\u00e9defghij"}',
        b"[[[[[]]]]]",
        b"[" * 5,
        b"[" * 3 + b'{"a": {"b": 1}}' + b"]" * 3,
    ],
)
def test_what_passes_a_cap_is_never_surely_within(data: bytes) -> None:
    # The shortcut that lets a small reply skip the scan: every document the
    # scan refuses for a cap is sent on to it.
    assert not surely_within(data, BOUNDS)
    with pytest.raises(BoundsExceeded):
        scan(data, BOUNDS, members=data.startswith(b"{"))


def test_a_small_document_is_surely_within_and_the_scan_agrees() -> None:
    bounds = JsonBounds(max_depth=4, max_items=20, max_string_bytes=64)
    for data in (b'{"type":"ready"}', b'{"a": [1, {"b": 2}]}', b"{}"):
        assert surely_within(data, bounds)
        scan(data, bounds, members=True)


def test_a_hostile_reply_too_deep_for_the_shortcut_is_still_scanned() -> None:
    # Strings cannot hide structure from the count: brackets inside them
    # count too, which only sends more documents to the scan.
    bounds = JsonBounds(max_depth=32, max_items=100_000, max_string_bytes=10**9)
    deep = b'{"type":"result","result":' + b"[" * 40 + b"]" * 40 + b"}"
    assert not surely_within(deep, bounds)
    with pytest.raises(BoundsExceeded, match="deeper"):
        scan(deep, bounds, members=True)
    in_strings = b'{"type":"result","result":"' + b"[" * 40 + b'"}'
    assert not surely_within(in_strings, bounds)
