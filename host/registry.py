"""The plugin registry: what is installed, and how each plugin fares.

All methods are safe to call from many threads at once; one lock guards the
tables, and nothing slow (no plugin code, no I/O) runs while it is held.
A server builds its own registry and passes it on; `get_registry()` is the
process-wide one of the SPEC's library use. It fulfils the sandbox's
`PluginCatalog`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from host.discovery import RegisteredPlugin, find_plugins, name_taken
from host.environments import EnvironmentStore, EnvState, EnvStatus
from sandbox.envelope import unknown_plugin_message
from sandbox.outcome import State
from sandbox.tool_runner import PluginNotReady, set_default_catalog

MAX_UNCHECKED_REPORTS = 1000


class EnvironmentNotReady(PluginNotReady):
    """A plugin whose declared packages are not installed yet; never run half-ready."""


class UnknownPluginError(KeyError):
    """No plugin of that name is registered."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return unknown_plugin_message(self.name)


@dataclass
class _Metrics:
    state: State = State.IDLE
    success_count: int = 0
    error_count: int = 0
    total_execution_time_ms: float = 0.0
    last_execution_time_ms: float | None = None
    last_used: str | None = None
    last_peak_rss_mb: float | None = None

    def as_dict(self) -> dict[str, Any]:
        calls = self.success_count + self.error_count
        return {
            "state": self.state.value,
            "success_count": self.success_count,
            "error_count": self.error_count,
            "last_execution_time_ms": self.last_execution_time_ms,
            "avg_execution_time_ms": (self.total_execution_time_ms / calls) if calls else None,
            "last_used": self.last_used,
            "last_peak_rss_mb": self.last_peak_rss_mb,
        }


class PluginRegistry:
    """Plugins by name, with per-plugin state and execution metrics."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._plugins: dict[str, RegisteredPlugin] = {}
        self._metrics: dict[str, _Metrics] = {}
        self.load_errors: list[str] = []
        # Where the plugins' own environments are; None: no plugin may declare any.
        self.environments: EnvironmentStore | None = None
        self._unchecked: set[tuple[str, str]] = set()

    def unchecked_options(self, name: str, options: dict[str, Any]) -> list[str]:
        """Option names passed to `name`, which declares no options schema,
        that were not reported before (to warn about each once; bounded)."""
        try:
            if self.get_plugin(name).manifest.options is not None:
                return []
        except UnknownPluginError:
            return []
        with self._lock:
            new = [key for key in options if (name, key) not in self._unchecked]
            if len(self._unchecked) < MAX_UNCHECKED_REPORTS:
                self._unchecked.update((name, key) for key in new)
            return new[:20]

    def environment(self, name: str) -> EnvState:
        """The state of a plugin's environment. Raises UnknownPluginError."""
        plugin = self.get_plugin(name)
        if plugin.requirements.empty:
            return EnvState(EnvStatus.NONE)
        if self.environments is None:
            return EnvState(EnvStatus.MISSING, message="this host keeps no plugin environments")
        return self.environments.state(name, plugin.requirements)

    def import_paths(self, name: str) -> tuple[str, ...]:
        """What a call of `name` imports from besides its directory and the
        standard library. Raises EnvironmentNotReady (`environment_failed`
        when its preparation failed, `environment_not_ready` while it may
        still come), UnknownPluginError. The error's message is the public
        one: no installer output, no host path."""
        state = self.environment(name)
        if state.status is EnvStatus.NONE:
            return ()
        if state.status is EnvStatus.READY and state.path is not None:
            return (str(state.path),)
        public = state.public()
        reason = "environment_failed" if state.status is EnvStatus.FAILED else None
        raise EnvironmentNotReady(
            f"the environment of plugin {name!r} is {state.status.value}: {public.get('message')}",
            reason or "environment_not_ready",
            {"environment": state.status.value},  # missing, preparing or failed
        )

    def register(self, name: str, plugin: RegisteredPlugin) -> None:
        """Add or replace `name`. Replacing keeps the metrics.

        No uniqueness check: `load_directory` and discovery decide which
        plugin may have a name before they register it.
        """
        with self._lock:
            self._plugins[name] = plugin
            self._metrics.setdefault(name, _Metrics())

    def unregister(self, name: str) -> None:
        """Remove `name` and its metrics; unknown names are ignored."""
        with self._lock:
            self._plugins.pop(name, None)
            self._metrics.pop(name, None)

    def get_plugin(self, name: str) -> RegisteredPlugin:
        """Return the plugin. Raises UnknownPluginError (a KeyError)."""
        with self._lock:
            try:
                return self._plugins[name]
            except KeyError:
                raise UnknownPluginError(name) from None

    def list_plugins(self) -> list[str]:
        """Names of every registered plugin, sorted."""
        with self._lock:
            return sorted(self._plugins)

    def get_status(self, name: str) -> dict[str, Any]:
        """State and metrics of one plugin. Raises UnknownPluginError."""
        with self._lock:
            if name not in self._plugins:
                raise UnknownPluginError(name)
            status = {"name": name, **self._metrics[name].as_dict()}
        status["environment"] = self.environment(name).public()
        return status

    def all_status(self) -> dict[str, dict[str, Any]]:
        """`get_status` of every plugin, by name."""
        with self._lock:
            return {name: self.get_status(name) for name in sorted(self._plugins)}

    def update_execution_metrics(
        self,
        plugin_name: str,
        state: State | str | None,
        elapsed_ms: float,
        had_error: bool,
        reason: str | None = None,
        peak_rss_mb: float | None = None,
    ) -> None:
        """Record one finished call. `state=None` leaves the state unchanged;
        `reason` (why it failed) is for recorders that count outcomes;
        `peak_rss_mb` (None: the call reached no child) is kept as the last one.

        Unknown plugins are ignored: a plugin may be unregistered mid-call.
        """
        with self._lock:
            metrics = self._metrics.get(plugin_name)
            if metrics is None:
                return
            if state is not None:
                metrics.state = State(state)
            if had_error:
                metrics.error_count += 1
            else:
                metrics.success_count += 1
            metrics.total_execution_time_ms += elapsed_ms
            metrics.last_execution_time_ms = elapsed_ms
            if peak_rss_mb is not None:
                metrics.last_peak_rss_mb = peak_rss_mb
            metrics.last_used = datetime.now(UTC).isoformat()

    def load_directory(self, path: str | Path) -> list[str]:
        """Register every plugin directory directly below `path` (or `path` itself).

        Returns the names registered. A bad manifest, or a name already
        registered from another directory (names are unique), is recorded in
        `load_errors` (message naming the file, the field and, for a taken
        name, both directories) and skipped. A plugin found again in the
        directory it was registered from is registered anew.
        """
        found, errors = find_plugins(Path(path))
        names = []
        with self._lock:
            self.load_errors.extend(errors)
            for plugin in found:
                holder = self._plugins.get(plugin.name)
                if holder is not None and holder.directory != plugin.directory:
                    self.load_errors.append(name_taken(plugin, holder))
                    continue
                self.register(plugin.name, plugin)
                names.append(plugin.name)
        return names

    def clear(self) -> None:
        """Forget every plugin, metric and load error."""
        with self._lock:
            self._plugins.clear()
            self._metrics.clear()
            self.load_errors.clear()


_registry = PluginRegistry()
# `ToolRunner()` with no catalog runs the plugins of this registry (SPEC
# section 3); a server passes its own registry and sandbox instead.
set_default_catalog(_registry)


def get_registry() -> PluginRegistry:
    """The process-wide registry (SPEC section 6): what the CLI and library
    callers register plugins in. The server keeps a registry of its own."""
    return _registry


__all__ = ["PluginRegistry", "RegisteredPlugin", "UnknownPluginError", "get_registry"]
