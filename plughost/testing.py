"""A pytest plugin for plugin authors: run a plugin through the real sandbox.

Installed with plughost (the `pytest11` entry point), it gives tests the
`plughost_run` fixture:

    def test_reports_format(plughost_run):
        result, error = plughost_run(Path(__file__).parent, png_bytes, options={})
        assert error == {}

Each call is a real call: a fresh isolated child, the manifest's limits, the
plugin's own environment (prepared before the call, in the directory
PLUGHOST_ENV_DIR names, default `<state dir>/envs`).

What a call gives back unpacks as the ToolRunner's `(result, error)` and
carries what its author needs besides (`PluginCall`): `.stdout` and
`.stderr` (what the plugin printed, the first 64 KiB of each), `.traceback`
(the plugin's own frames, the host's stripped) and `.measured`. A failing
test's report shows each call's outcome, traceback and output (a section
"Captured plughost ... call"), and `assert error == {}` on a failed call
explains itself with the plugin's message and traceback instead of a diff
of the envelope.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


class CallError(dict[str, Any]):
    """The envelope of a failed call (a dict, as the ToolRunner gives it),
    with the plugin's own traceback and what it printed."""

    traceback: str = ""
    output: str = ""

    def summary(self) -> str:
        error = self.get("error", {})
        reason = error.get("details", {}).get("reason", "?")
        return f"the call failed: {reason}: {error.get('message', '')}"


class FailedResult(dict[str, Any]):
    """The empty result of a failed call: reading a key says why it is empty."""

    def __init__(self, error: CallError) -> None:
        super().__init__()
        self.error = error

    def __missing__(self, key: object) -> Any:
        raise KeyError(f"{key!r}: no result, {self.error.summary()}")


class PluginCall(tuple[dict[str, Any], dict[str, Any]]):
    """`(result, error)` of one call, and `.stdout`, `.stderr`, `.traceback`
    (the plugin's frames), `.measured` (elapsed_ms, peak_rss_mb, ...)."""

    stdout: str
    stderr: str
    traceback: str
    measured: dict[str, Any]

    @property
    def result(self) -> dict[str, Any]:
        return self[0]

    @property
    def error(self) -> dict[str, Any]:
        return self[1]


Runner = Callable[..., PluginCall]


@pytest.fixture(scope="session")
def plughost_sandbox() -> Iterator[Any]:
    """One sandbox (one launcher) for the test session."""
    from sandbox.supervisor import Sandbox

    sandbox = Sandbox()
    yield sandbox
    sandbox.close()


def _report(name: str, call: PluginCall, printed: str) -> str:
    """One call, as a failing test's report shows it."""
    error = call.error
    lines = [f"{name}: {error.summary() if isinstance(error, CallError) else 'ok'}"]
    if call.traceback:
        lines.append(call.traceback)
    lines.append(f"what it printed:\n{printed}" if printed else "it printed nothing")
    return "\n".join(lines)


def _made(
    name: str, result: dict[str, Any], error: dict[str, Any], measured: dict[str, Any]
) -> PluginCall:
    from host.tracebacks import plugin_output, plugin_traceback

    output = measured.get("output") or {}
    trace = plugin_traceback(error) if error else ""
    if error:
        failed = CallError(error)
        failed.traceback, failed.output = trace, plugin_output(measured)
        error, result = failed, FailedResult(failed)
    call = PluginCall((result, error))
    call.stdout, call.stderr = output.get("stdout", ""), output.get("stderr", "")
    call.traceback, call.measured = trace, measured
    return call


@pytest.fixture
def plughost_run(plughost_sandbox: Any, request: pytest.FixtureRequest) -> Runner:
    """`plughost_run(directory, image, options=None, mime_type="image/png")`
    -> `PluginCall`, which unpacks as `(result, error)`, the ToolRunner contract."""
    from host.config import load_settings
    from host.discovery import find_plugins
    from host.environments import EnvStatus
    from host.preparation import environment_store, prepare_all
    from host.registry import PluginRegistry
    from host.tracebacks import plugin_output
    from sandbox.tool_runner import ToolRunner

    settings = load_settings()
    environments = environment_store(settings.plugin_envs, settings.allow_source_builds)

    def run(
        directory: str | Path,
        image: bytes,
        options: dict[str, Any] | None = None,
        mime_type: str = "image/png",
    ) -> PluginCall:
        __tracebackhide__ = True
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
        call = _made(found[0].name, *runner.measure(found[0].name, payload))
        report = _report(found[0].name, call, plugin_output(call.measured))
        request.node.add_report_section("call", f"plughost {found[0].name}", report)
        return call

    return run


def pytest_assertrepr_compare(
    config: pytest.Config, op: str, left: Any, right: Any
) -> list[str] | None:
    """`assert error == {}` on a failed call: the plugin's message and its
    own traceback, not a diff of the envelope."""
    failed = (
        left if isinstance(left, CallError) else right if isinstance(right, CallError) else None
    )
    if op != "==" or failed is None or not failed:
        return None
    lines = [failed.summary().replace("the call failed", "the plugin's call failed")]
    lines += failed.traceback.splitlines()
    lines.append("(its output: the 'Captured plughost' section of this test's report)")
    return lines
