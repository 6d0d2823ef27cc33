"""Every node (a single server, an API node, a worker node) gets its sandbox
and its plugins from `node_plugins`."""

from __future__ import annotations

from pathlib import Path

import pytest

from host.config import Settings
from host.services.node import node_plugins
from tests.conftest import write_plugin


def test_a_node_gets_its_sandbox_and_the_discovered_plugins(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "echo", "return {}")
    settings = Settings(
        plugins_dirs=[str(tmp_path / "plugins")],
        state_dir=str(tmp_path / "state"),
        isolation="strict",
        disable_layers=["seccomp"],
    )
    registry, sandbox = node_plugins(settings)
    try:
        assert "echo" in registry.list_plugins()  # beside the bundled ones
        assert not registry.load_errors
        assert sandbox.isolation == "strict"
        assert (tmp_path / "state").is_dir()
    finally:
        sandbox.close()


def test_an_unknown_layer_is_refused_before_anything_is_discovered(tmp_path: Path) -> None:
    settings = Settings(
        plugins_dirs=[str(tmp_path / "plugins")],
        state_dir=str(tmp_path / "state"),
        disable_layers=["no-such-layer"],
    )
    with pytest.raises(ValueError, match="no-such-layer"):
        node_plugins(settings)
    assert not (tmp_path / "state").exists()
