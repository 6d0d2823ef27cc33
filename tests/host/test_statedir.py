"""The state directory is the host's user's alone when plughost creates it."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from host.config import Settings
from host.services.build import plugin_service


@pytest.fixture
def usual_umask() -> Iterator[None]:
    previous = os.umask(0o022)  # what a service manager or a login shell gives
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("usual_umask")
def test_a_new_state_dir_and_the_parents_plughost_creates_are_0700(tmp_path: Path) -> None:
    state = tmp_path / "srv" / "plughost" / "state"
    plugins = plugin_service(Settings(state_dir=str(state), prewarm=0, self_check=False))
    try:
        assert state.is_dir()
        assert _mode(state) == 0o700
        assert _mode(tmp_path / "srv") == _mode(tmp_path / "srv" / "plughost") == 0o700
    finally:
        plugins.close()


@pytest.mark.usefixtures("usual_umask")
def test_an_existing_state_dir_others_may_enter_is_warned_of_and_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from host.statedir import make_private_dir

    state = tmp_path / "shared"
    state.mkdir(mode=0o755)
    with caplog.at_level(logging.WARNING, logger="plughost.state"):
        make_private_dir(state)
    assert _mode(state) == 0o755
    assert str(state) in caplog.text and "0755" in caplog.text
    caplog.clear()
    state.chmod(0o700)
    with caplog.at_level(logging.WARNING, logger="plughost.state"):
        make_private_dir(state)
    assert caplog.text == ""
