"""The per-call uid range is a setting of the Sandbox, read when one is made."""

from __future__ import annotations

import pytest

from sandbox.supervisor import DEFAULT_UID_BASE, UID_SLOTS, Sandbox, uid_range


def test_the_range_starts_at_its_base_and_holds_every_slot() -> None:
    assert uid_range(1_700_000) == range(1_700_000, 1_700_000 + UID_SLOTS)


def test_the_environment_is_read_when_a_sandbox_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUGHOST_UID_BASE", "1234567")
    from_env, given = Sandbox(), Sandbox(uid_base=2_000_000)
    try:
        assert from_env.uid_range.start == 1234567
        assert given.uid_range.start == 2_000_000  # the argument wins
    finally:
        from_env.close()
        given.close()
    monkeypatch.delenv("PLUGHOST_UID_BASE")
    assert uid_range().start == DEFAULT_UID_BASE


@pytest.mark.parametrize(("env", "words"), [("lots", "must be an integer"), ("0", "positive")])
def test_a_bad_base_is_refused_with_its_name(
    monkeypatch: pytest.MonkeyPatch, env: str, words: str
) -> None:
    monkeypatch.setenv("PLUGHOST_UID_BASE", env)
    with pytest.raises(ValueError, match=words):
        Sandbox()
