"""Recent outcomes per plugin: bounded, newest first, public parts only."""

from __future__ import annotations

from host.recent import RecentOutcomes
from sandbox.envelope import make_envelope


def test_rings_keep_the_newest_outcomes_and_a_bounded_number_of_plugins() -> None:
    recent = RecentOutcomes(size=3, max_plugins=2)
    for i in range(5):
        recent.add("a", 0.001 * i, {f"k{i}": i}, {})
    assert [entry["result_keys"] for entry in recent.of("a")] == [["k4"], ["k3"], ["k2"]]
    recent.add("b", 0.1, {"x": 1}, {})
    recent.add("c", 0.1, {"x": 1}, {})  # the plugin seen longest ago ("a") goes
    assert recent.of("a") == [] and len(recent.of("b")) == len(recent.of("c")) == 1


def test_an_error_keeps_its_public_envelope_and_never_the_internal_part() -> None:
    recent = RecentOutcomes()
    error = make_envelope("plugin_raised", "kaboom", plugin="p", traceback="secret trace")
    recent.add("p", 0.25, {}, error)
    (entry,) = recent.of("p")
    assert entry["outcome"] == "plugin_raised" and entry["elapsed_ms"] == 250.0
    assert entry["error"]["message"] == "kaboom" and "secret trace" not in repr(entry)
    assert "_internal" not in repr(entry)


def test_each_outcome_keeps_its_caller_and_a_scope_sees_only_its_own() -> None:
    recent = RecentOutcomes()
    recent.add(
        "p", 0.1, {}, make_envelope("invalid_input", "bad 'secret-a'", plugin="p"), "client-a"
    )
    recent.add("p", 0.1, {"k": 1}, {}, "client-b")
    recent.add("p", 0.1, {"cli": 1}, {})  # no client's call (the CLI's)
    assert [e["owner"] for e in recent.of("p")] == [None, "client-b", "client-a"]
    assert [e["result_keys"] for e in recent.of("p", "client-b")] == [["k"]]
    assert "secret-a" not in repr(recent.of("p", "client-b"))
    assert recent.of("p", "anonymous") == []
