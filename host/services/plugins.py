"""PluginManagementService: the layer that owns the ToolRunner.

It knows the installed plugins, refuses quarantined ones, runs the others
through `self._runner.run(...)` (never catching around it: the ToolRunner
returns every failure as an envelope), and keeps the per-plugin quarantine
streaks and call metrics. Each finished call is recorded once, by the
ToolRunner, into `CallRecorder`: registry state and metrics, quarantine
streak and the Prometheus counters together.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from host.discovery import RegisteredPlugin, discover
from host.errors import Rejected, envelope
from host.metrics import Metrics
from host.preparation import BackgroundPreparation
from host.quarantine import QuarantineBook
from host.registry import PluginRegistry
from host.tracebacks import plugin_traceback
from sandbox.cancel import CancelToken, use_token
from sandbox.envelope import Envelope, unknown_plugin
from sandbox.limits import HostLimits
from sandbox.outcome import Origin, State, reason_of
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import InvalidInput, ToolRunner, validate_payload

log = logging.getLogger("plughost.services")


class CallRecorder:
    """The host's side of the sandbox's `PluginCatalog`: plugins come from the
    registry, and each finished call is recorded in the registry, the
    quarantine book and the metrics at once."""

    def __init__(
        self, registry: PluginRegistry, quarantine: QuarantineBook, metrics: Metrics
    ) -> None:
        self.registry = registry
        self.quarantine = quarantine
        self.metrics = metrics

    def get_plugin(self, name: str) -> RegisteredPlugin:
        return self.registry.get_plugin(name)

    def list_plugins(self) -> list[str]:
        return self.registry.list_plugins()

    def import_paths(self, name: str) -> tuple[str, ...]:
        return self.registry.import_paths(name)

    def update_execution_metrics(
        self,
        plugin_name: str,
        state: State | None,
        elapsed_ms: float,
        had_error: bool,
        reason: str | None = None,
        peak_rss_mb: float | None = None,
    ) -> None:
        self.registry.update_execution_metrics(
            plugin_name, state, elapsed_ms, had_error, reason, peak_rss_mb
        )
        health = False if reason is None else reason_of(reason).health
        if health is not None:  # an outcome that says something of the plugin's health
            self.quarantine.record(plugin_name, unavailable=health)
        self.metrics.observe_call(plugin_name, reason or "success", elapsed_ms / 1000)


class PluginManagementService:
    """Runs plugins through the ToolRunner, with quarantine and metrics.

    `sandbox` is the one the server runs every call in; the service closes
    it in `close()`.
    """

    def __init__(
        self,
        registry: PluginRegistry,
        sandbox: Sandbox,
        limits: HostLimits | None = None,
        quarantine: QuarantineBook | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.registry = registry
        self.quarantine = quarantine or QuarantineBook()
        self.metrics = metrics or Metrics()
        recorder = CallRecorder(registry, self.quarantine, self.metrics)
        self._runner = ToolRunner(recorder, sandbox, limits)
        # Prepares the plugins' environments on a thread; started by the server.
        self.preparation = BackgroundPreparation(self.registry)

    @property
    def limits(self) -> HostLimits:
        return self._runner.limits

    @property
    def sandbox(self) -> Sandbox:
        """The sandbox every call of this service runs in."""
        return self._runner.sandbox

    def protections(self) -> dict[str, bool]:
        """Isolation layers active for the calls this service makes."""
        return self.sandbox.protections()

    def sandbox_paths(self) -> list[Path]:
        """Start the sandbox's launcher now; return the directories the
        sandbox writes in for every call (what a server giving up root hands
        over)."""
        self.sandbox.launcher.start()
        return self.sandbox.host_paths()

    def check(self, plugin_name: Any, payload: Any) -> None:
        """Refuse a call that cannot run. Raises Rejected with its envelope."""
        if not isinstance(plugin_name, str) or plugin_name not in self.registry.list_plugins():
            raise Rejected(unknown_plugin(plugin_name).to_dict())
        try:
            validate_payload(payload, self._runner.limits)
        except InvalidInput as exc:
            raise Rejected(envelope("invalid_input", str(exc), plugin=plugin_name)) from exc
        retry = self.quarantine.retry_after(plugin_name)
        if retry is not None:
            raise Rejected(self._quarantined(plugin_name, retry))

    def _quarantined(self, plugin_name: str, retry: float) -> dict[str, Any]:
        return envelope(
            "quarantined",
            f"plugin {plugin_name!r} is quarantined after "
            f"{self.quarantine.threshold} unavailable outcomes in a row",
            plugin=plugin_name,
            retry_after_s=round(retry, 1),
        )

    def warm_uids(self) -> list[int]:
        """Uids of the prewarmed children waiting for a call."""
        return sorted(self.sandbox.warm_uids())

    def close(self) -> None:
        """Stop the sandbox this service runs plugins in (warm children, launcher)."""
        self.sandbox.close()

    @staticmethod
    def cancellation() -> CancelToken:
        """A token to pass to `execute_plugin` so the call can be cancelled."""
        return CancelToken()

    def execute_plugin(
        self, plugin_name: str, payload: Any, cancel: CancelToken | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run one call; return `(result, {})` or `({}, envelope)`."""
        retry = self.quarantine.retry_after(plugin_name)
        if retry is not None:
            self.metrics.observe_call(plugin_name, "quarantined", 0.0)
            return {}, self._quarantined(plugin_name, retry)
        self._warn_unchecked(plugin_name, payload)
        token = cancel or CancelToken()
        try:
            with use_token(token):
                result, error = self._runner.run(plugin_name=plugin_name, payload=payload)
        finally:
            if cancel is None:
                token.close()
        if error and Envelope.of(error).reason == "internal":
            # A host-side failure: the operator needs the traceback, the client never sees it.
            failure = Envelope.of(error)
            log.error(
                "host-side failure: %s",
                failure.message,
                extra={"plugin": plugin_name, "traceback": failure.traceback},
            )
        elif error and reason_of(Envelope.of(error).reason).origin is Origin.CHILD:
            # The plugin's own code failed: its frames (never the host's) for the operator.
            log.warning(
                "plugin %s failed (%s): %s",
                plugin_name,
                Envelope.of(error).reason,
                Envelope.of(error).message,
                extra={"plugin": plugin_name, "traceback": plugin_traceback(error)},
            )
        return result, error

    def _warn_unchecked(self, plugin_name: str, payload: Any) -> None:
        options = payload.get("options") if isinstance(payload, dict) else None
        if isinstance(options, dict) and options:
            unchecked = self.registry.unchecked_options(plugin_name, options)
            if unchecked:
                log.warning(
                    "plugin %s declares no options schema; options %s are passed unchecked",
                    plugin_name,
                    ", ".join(repr(k[:64]) for k in unchecked),
                    extra={"plugin": plugin_name},
                )

    def describe(self, name: str) -> dict[str, Any]:
        """Manifest, limits, state, metrics and quarantine of one plugin.

        Raises Rejected (unknown_plugin) for a name that is not registered.
        """
        try:
            plugin = self.registry.get_plugin(name)
        except KeyError:
            raise Rejected(unknown_plugin(name).to_dict()) from None
        limits = self._runner.limits.clamp(plugin.manifest.plugin_limits)
        status = self.registry.get_status(name)
        return {
            "name": name,
            "version": plugin.manifest.version,
            "description": plugin.manifest.description,
            "entrypoint": plugin.manifest.entrypoint,
            "source": plugin.source,
            "limits": {"timeout_s": limits.timeout_s, "memory_mb": limits.memory_mb},
            "dependencies": list(plugin.requirements.dependencies),
            "environment": status.pop("environment"),
            "options_schema": plugin.manifest.options,
            "state": status["state"],
            "metrics": {k: v for k, v in status.items() if k not in ("name", "state")},
            "quarantine": self.quarantine.status(name),
        }

    def list_plugins(self) -> list[dict[str, Any]]:
        return [self.describe(name) for name in self.registry.list_plugins()]

    def reset_quarantine(self, name: str) -> dict[str, Any]:
        """Lift the quarantine of `name`; return its description."""
        self.describe(name)  # raises for an unknown plugin
        self.quarantine.reset(name)
        return self.describe(name)

    def reload(
        self, extra_dirs: Sequence[str | Path], overrides: Mapping[str, str | Path] | None = None
    ) -> list[str]:
        """Discover plugins again, with the same name rule as at start-up
        (`discover`); metrics of plugins that stay are kept."""
        before = set(self.registry.list_plugins())
        self.registry.load_errors.clear()
        names = discover(self.registry, extra_dirs, overrides)
        for gone in before - set(names):
            self.registry.unregister(gone)
        if self.preparation.started:
            self.preparation.start()  # the new plugins' environments
        return sorted(names)


__all__ = ["CallRecorder", "PluginManagementService"]
