"""What a plugin prints is its author's to see (`ToolRunner.measure`'s
`output`, bounded), never its client's; what it returns that JSON cannot
hold is named by its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from host.registry import PluginRegistry
from sandbox.call import OUTPUT_BYTES
from sandbox.child import _not_json
from sandbox.envelope import Envelope
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner
from tests.conftest import write_plugin

SECRET = "printed-for-the-author-only"


def _runner(tmp_path: Path, sandbox: Sandbox, name: str, body: str) -> ToolRunner:
    registry = PluginRegistry()
    registry.load_directory(write_plugin(tmp_path, name, body).parent)
    return ToolRunner(registry, sandbox)


@pytest.mark.parametrize("ending", ["return {'ok': True}", "raise ValueError('boom')"])
def test_what_a_plugin_prints_reaches_its_author_and_never_its_client(
    tmp_path: Path, sandbox: Sandbox, payload: dict, ending: str
) -> None:
    body = f"print({SECRET!r})\nprint({SECRET!r} + '-err', file=sys.stderr)\n{ending}"
    runner = _runner(tmp_path, sandbox, "talker", body)
    result, error, measured = runner.measure("talker", payload)
    assert measured["output"]["stdout"] == SECRET + "\n"
    assert measured["output"]["stderr"] == SECRET + "-err\n"
    if error:
        assert Envelope.of(error).reason == "plugin_raised"
    # What a client is answered: the result, or the envelope's public part.
    answer = json.dumps(result) + json.dumps(Envelope.of(error).public() if error else {})
    stdout_only = answer.replace(SECRET + "-err", "")
    assert SECRET not in stdout_only
    assert "output" not in json.dumps(error)


def test_the_authors_output_is_cut_at_its_bound_with_a_marker(
    tmp_path: Path, sandbox: Sandbox, payload: dict
) -> None:
    body = "print('first line')\nsys.stdout.write('x' * 200_000)\nreturn {}"
    runner = _runner(tmp_path, sandbox, "chatty", body)
    result, error, measured = runner.measure("chatty", payload)
    assert error == {} and result == {}
    stdout = measured["output"]["stdout"]
    assert stdout.startswith("first line\n")
    assert len(stdout) < OUTPUT_BYTES + 200
    assert f"output cut at {OUTPUT_BYTES} bytes; {200_011 - OUTPUT_BYTES} more not kept" in stdout


def test_what_it_printed_before_sys_exit_is_kept(
    tmp_path: Path, sandbox: Sandbox, payload: dict
) -> None:
    runner = _runner(tmp_path, sandbox, "quitter", "print('about to quit')\nsys.exit(3)")
    _, error, measured = runner.measure("quitter", payload)
    assert Envelope.of(error).reason == "crashed"
    assert measured["output"]["stdout"] == "about to quit\n"


def test_a_bytes_result_names_its_key_its_type_and_what_to_do(
    tmp_path: Path, sandbox: Sandbox, payload: dict
) -> None:
    body = "return {'size': 3, 'thumb': [b'abc']}"
    runner = _runner(tmp_path, sandbox, "byter", body)
    _, error = runner.run("byter", payload)
    envelope = Envelope.of(error)
    assert envelope.reason == "invalid_output"
    assert 'result["thumb"][0] is bytes' in envelope.message
    assert "base64" in envelope.message
    assert "json/encoder.py" not in envelope.traceback


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            {"a": {"b": [1, {2, 3}]}},
            'result["a"]["b"][1] is set, which JSON cannot hold: make it a list',
        ),
        ({"x": float("nan")}, 'result["x"] is nan, which JSON cannot hold: return None'),
        ({(1, 2): 0}, "result has a key of type tuple: make its keys str"),
        ({"k": {float("inf"): 1}}, 'result["k"] has a key that is inf, which JSON cannot hold'),
        ({"n": 10**5000}, 'result["n"] is an int too long to write as text: return it as a str'),
        ({"p": Path("/")}, 'result["p"] is pathlib.PosixPath, which JSON cannot hold'),
        ({"ok": [1, 2.5, "s", None, True]}, None),
    ],
)
def test_the_walk_names_the_first_value_json_cannot_hold(value: dict, expected: str | None) -> None:
    found = _not_json(value, "result")
    assert (
        found == expected if expected is None else found is not None and found.startswith(expected)
    )


def test_a_result_that_contains_itself_is_named_not_a_recursion() -> None:
    value: dict = {"a": []}
    value["a"].append(value)
    assert _not_json(value, "result") == 'result["a"][0] contains itself (a reference cycle)'


def _shared(depth: int, leaf: object) -> list:
    """A list of `depth` levels whose two items are the same list: 2**depth paths."""
    value: list = [leaf, leaf]
    for _ in range(depth):
        value = [value, value]
    return value


def test_the_walk_of_a_result_that_shares_its_parts_is_bounded() -> None:
    # 2**60 paths to walk: without a bound on its steps the walk never ends
    # (the call's deadline would end it, as a timeout rather than invalid_output).
    assert _not_json({"a": _shared(60, 1)}, "result") is None
    found = _not_json({"a": _shared(60, {float("nan"): 1})}, "result")
    assert found is not None and "has a key that is nan" in found


def test_a_long_key_that_is_a_host_path_is_never_shown_cut(
    tmp_path: Path, sandbox: Sandbox, payload: dict
) -> None:
    # A key made of the plugin's own path, longer than a key is shown: cut in
    # two, the host could no longer recognise (and hide) its directory.
    body = "return {os.path.join(os.path.dirname(__file__), 'm' * 80): b'weights'}"
    runner = _runner(tmp_path / ("d" * 40), sandbox, "pathkey", body)
    _, error = runner.run("pathkey", payload)
    envelope = Envelope.of(error)
    assert envelope.reason == "invalid_output"
    assert "<a key of" in envelope.message and "is bytes" in envelope.message
    assert str(tmp_path)[:20] not in json.dumps(error)
