"""The registry: thread-safe, a true mean, aware timestamps, directory loading."""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path

import pytest

from host.manifest import Manifest
from host.registry import PluginRegistry, RegisteredPlugin, UnknownPluginError


def _plugin(name: str) -> RegisteredPlugin:
    manifest = Manifest(name=name, version="1", entrypoint="m:C")
    return RegisteredPlugin(manifest=manifest, directory=Path("/nonexistent"))


def test_average_is_the_true_mean_of_all_calls() -> None:
    registry = PluginRegistry()
    registry.register("p", _plugin("p"))
    for elapsed in (10.0, 20.0, 60.0):
        registry.update_execution_metrics("p", "SUCCESS", elapsed, False)
    status = registry.get_status("p")
    assert status["avg_execution_time_ms"] == pytest.approx(30.0)  # (a+b)/2 chains give 40
    assert status["last_execution_time_ms"] == 60.0


def test_last_used_is_timezone_aware_utc() -> None:
    registry = PluginRegistry()
    registry.register("p", _plugin("p"))
    assert registry.get_status("p")["last_used"] is None
    registry.update_execution_metrics("p", "ERROR", 1.0, True)
    stamp = datetime.fromisoformat(registry.get_status("p")["last_used"])
    assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0


def test_state_none_leaves_the_state_unchanged() -> None:
    registry = PluginRegistry()
    registry.register("p", _plugin("p"))
    registry.update_execution_metrics("p", "UNAVAILABLE", 1.0, True)
    registry.update_execution_metrics("p", None, 1.0, True)
    assert registry.get_status("p")["state"] == "UNAVAILABLE"


def test_unknown_plugin_raises_a_key_error_subclass() -> None:
    registry = PluginRegistry()
    with pytest.raises(KeyError):
        registry.get_plugin("nope")
    with pytest.raises(UnknownPluginError, match="nope"):
        registry.get_status("nope")


def test_concurrent_updates_lose_no_call() -> None:
    registry = PluginRegistry()
    registry.register("p", _plugin("p"))
    barrier = threading.Barrier(8)

    def hammer() -> None:
        barrier.wait()
        for _ in range(2000):
            registry.update_execution_metrics("p", "SUCCESS", 1.0, False)
            registry.get_status("p")

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    status = registry.get_status("p")
    assert status["success_count"] == 16000
    assert status["avg_execution_time_ms"] == pytest.approx(1.0)


def test_load_directory_registers_plugins_and_reports_bad_manifests(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    (good / "plugin.toml").write_text('name = "good"\nversion = "1"\nentrypoint = "mod:C"\n')
    (good / "mod.py").write_text("class C:\n    def run(self, p):\n        return {}\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "plugin.toml").write_text('name = "Bad Name!"\nversion = "1"\nentrypoint = "mod:C"\n')
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "plugin.toml").write_text("name = \n")
    registry = PluginRegistry()
    assert registry.load_directory(tmp_path) == ["good"]
    assert registry.list_plugins() == ["good"]
    assert any(str(bad / "plugin.toml") in e and "field 'name'" in e for e in registry.load_errors)
    assert any(str(broken / "plugin.toml") in e and "TOML" in e for e in registry.load_errors)
