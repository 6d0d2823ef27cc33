"""A pytest plugin for plugin authors: run a plugin through the real sandbox.

Installed with plughost (the `pytest11` entry point), it gives tests the
`plughost_run` fixture:

    def test_reports_format(plughost_run):
        result, error = plughost_run(Path(__file__).parent, png_bytes, options={})
        assert error == {}

Each call is a real call: a fresh isolated child, the manifest's limits, the
plugin's own environment (prepared before the call, in the directory
PLUGHOST_ENV_DIR names, default `<state dir>/envs`). The envelope of a failed
call includes `_internal.traceback`, so a test can print it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

Runner = Callable[..., tuple[dict[str, Any], dict[str, Any]]]


@pytest.fixture(scope="session")
def plughost_sandbox() -> Iterator[Any]:
    """One sandbox (one launcher) for the test session."""
    from sandbox.supervisor import Sandbox

    sandbox = Sandbox()
    yield sandbox
    sandbox.close()


@pytest.fixture
def plughost_run(plughost_sandbox: Any) -> Runner:
    """`plughost_run(directory, image, options=None, mime_type="image/png")`
    -> `(result, error)`, the ToolRunner contract."""
    from host.config import load_settings
    from host.discovery import find_plugins
    from host.environments import EnvStatus
    from host.preparation import environment_store, prepare_all
    from host.registry import PluginRegistry
    from sandbox.tool_runner import ToolRunner

    settings = load_settings()
    environments = environment_store(settings.plugin_envs, settings.allow_source_builds)

    def run(
        directory: str | Path,
        image: bytes,
        options: dict[str, Any] | None = None,
        mime_type: str = "image/png",
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        found, errors = find_plugins(Path(directory))
        if errors or len(found) != 1:
            pytest.fail(f"{directory}: not one loadable plugin: {errors or 'none found'}")
        registry = PluginRegistry()
        registry.environments = environments
        registry.register(found[0].name, found[0])
        for name, state in prepare_all(registry).items():
            if state.status is not EnvStatus.READY:
                pytest.fail(f"plugin {name}: {state.message}")
        payload = {"image": image, "mime_type": mime_type, "options": options or {}}
        runner = ToolRunner(registry, plughost_sandbox)
        return runner.run(found[0].name, payload)

    return run
