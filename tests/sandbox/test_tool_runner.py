"""The ToolRunner contract (SPEC section 3), out of process."""

from __future__ import annotations

import base64
import statistics
from datetime import datetime

import pytest

from host.registry import PluginRegistry
from sandbox.tool_runner import ToolRunner


def test_happy_path_returns_result_and_empty_error(runner: ToolRunner, payload: dict) -> None:
    result, error = runner.run("image_info", payload)
    assert error == {}
    assert result["format"] == "PNG"
    assert (result["width"], result["height"]) == (64, 48)


def test_base64_image_is_accepted(runner: ToolRunner, png: bytes) -> None:
    encoded = base64.b64encode(png).decode()
    result, error = runner.run("image_info", {"image": encoded, "mime_type": "image/png"})
    assert error == {} and result["width"] == 64


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"image": b"", "mime_type": "image/png"}, "'image' is empty"),
        ({"mime_type": "image/png"}, "'image' is missing"),
        ({"image": b"abc"}, "'mime_type' is missing"),
        ({"image": b"abc", "mime_type": "text/html"}, "'mime_type' 'text/html'"),
        ({"image": "not base64!!", "mime_type": "image/png"}, "not valid base64"),
        ({"image": b"abc", "mime_type": "image/png", "options": [1]}, "'options' must be"),
        ({"image": b"abc", "mime_type": "image/png", "extra": 1}, "unknown fields: extra"),
        ("just a string", "payload must be a dict"),
        (None, "payload must be a dict"),
    ],
)
def test_invalid_input_becomes_validation_error(
    runner: ToolRunner, registry: PluginRegistry, payload: object, needle: str
) -> None:
    result, error = runner.run("image_info", payload)
    assert result == {}
    assert error["error"]["type"] == "ValidationError"
    assert error["error"]["details"]["reason"] == "invalid_input"
    assert needle in error["error"]["message"]
    # A rejected input does not count as a call and leaves the state alone.
    status = registry.get_status("image_info")
    assert status["state"] == "IDLE" and status["error_count"] == 0


def test_oversized_image_is_rejected_before_running(runner: ToolRunner) -> None:
    big = b"\x89PNG" + b"\0" * runner.limits.max_image_bytes
    _, error = runner.run("image_info", {"image": big, "mime_type": "image/png"})
    assert error["error"]["details"]["reason"] == "invalid_input"
    assert "limit" in error["error"]["message"]


def test_unknown_plugin_is_an_envelope_not_a_key_error(runner: ToolRunner, payload: dict) -> None:
    result, error = runner.run("no_such_plugin", payload)
    assert result == {}
    assert error["error"]["type"] == "ValidationError"
    assert error["error"]["details"]["reason"] == "unknown_plugin"
    assert error["error"]["plugin"] is None


def test_envelope_has_the_spec_structure(runner: ToolRunner, payload: dict) -> None:
    _, error = runner.run("raise_kaboom", payload)
    assert set(error) == {"error", "_internal"}
    assert set(error["error"]) == {"type", "message", "details", "plugin", "timestamp"}
    assert error["error"]["plugin"] == "raise_kaboom"
    stamp = datetime.fromisoformat(error["error"]["timestamp"])
    assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0
    assert "RuntimeError: kaboom" in error["_internal"]["traceback"]
    assert "\n" not in error["error"]["message"]


def test_plugin_exception_message_becomes_the_error_message(
    runner: ToolRunner, payload: dict, registry: PluginRegistry
) -> None:
    _, error = runner.run("raise_kaboom", payload)
    assert error["error"]["type"] == "ExecutionError"
    assert error["error"]["message"] == "kaboom"
    assert error["error"]["details"]["reason"] == "plugin_raised"
    assert registry.get_status("raise_kaboom")["state"] == "ERROR"


@pytest.mark.parametrize("plugin", ["return_none", "return_list"])
def test_non_dict_output_is_invalid_output(runner: ToolRunner, payload: dict, plugin: str) -> None:
    result, error = runner.run(plugin, payload)
    assert result == {}
    assert error["error"]["type"] == "ValidationError"
    assert error["error"]["details"]["reason"] == "invalid_output"


def test_metrics_are_updated_after_every_call_with_a_true_mean(
    runner: ToolRunner, payload: dict, registry: PluginRegistry
) -> None:
    assert registry.get_status("image_info")["state"] == "IDLE"
    elapsed = []
    for _ in range(3):
        runner.run("image_info", payload)
        elapsed.append(registry.get_status("image_info")["last_execution_time_ms"])
    runner.run("raise_kaboom", payload)
    status = registry.get_status("image_info")
    assert status["success_count"] == 3 and status["error_count"] == 0
    assert status["avg_execution_time_ms"] == pytest.approx(statistics.mean(elapsed))
    assert status["state"] == "SUCCESS"
    assert datetime.fromisoformat(status["last_used"]).utcoffset() is not None
    kaboom = registry.get_status("raise_kaboom")
    assert kaboom["error_count"] == 1 and kaboom["success_count"] == 0


def test_host_bug_becomes_internal_error_and_is_counted(
    runner: ToolRunner, payload: dict, registry: PluginRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: object, call: object, token: object = None) -> None:
        raise RuntimeError("host bug")

    monkeypatch.setattr(type(runner.sandbox), "execute", broken)
    result, error = runner.run("image_info", payload)
    assert result == {}
    assert error["error"]["type"] == "InternalError"
    assert error["error"]["details"]["reason"] == "internal"
    assert "host bug" in error["_internal"]["traceback"]
    assert "host bug" not in error["error"]["message"]
    status = registry.get_status("image_info")
    assert status["error_count"] == 1 and status["state"] == "IDLE"


def test_run_can_be_replaced_on_the_class(
    runner: ToolRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake(self: ToolRunner, plugin_name: str, payload: object) -> tuple[dict, dict]:
        return {"fake": plugin_name}, {}

    monkeypatch.setattr(ToolRunner, "run", fake)
    assert runner.run("anything", {}) == ({"fake": "anything"}, {})
