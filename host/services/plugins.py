"""PluginManagementService: the layer that owns the ToolRunner.

It knows the installed plugins, refuses quarantined ones, runs the others
through `self._runner.run(...)` (never catching around it: the ToolRunner
returns every failure as an envelope), and keeps the per-plugin quarantine
streaks, call metrics and a ring of recent outcomes for the console. Each
finished call is recorded once, by the ToolRunner, into `CallRecorder`:
registry state and metrics, quarantine streak and the Prometheus counters
and histograms (latency and the call's peak memory) together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from host.discovery import RegisteredPlugin, discover
from host.errors import Rejected, envelope
from host.metrics import Metrics, MiB
from host.preparation import BackgroundPreparation
from host.quarantine import QuarantineBook
from host.recent import RecentOutcomes
from host.registry import PluginRegistry
from host.services.payloads import check_image_type
from host.tracebacks import plugin_traceback
from sandbox.call import CancelToken, use_token
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
        peak = None if peak_rss_mb is None else int(peak_rss_mb * MiB)
        self.metrics.observe_call(plugin_name, reason or "success", elapsed_ms / 1000, peak)


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
        self.recent = RecentOutcomes()
        recorder = CallRecorder(registry, self.quarantine, self.metrics)
        self._runner = ToolRunner(recorder, sandbox, limits)
        # Prepares the plugins' environments on a thread; started by the server.
        self.preparation = BackgroundPreparation(self.registry)
        self._export_plugin_gauges()

    def _export_plugin_gauges(self) -> None:
        """Each registered plugin's limits and quarantine, read at scrape time,
        so a dashboard can set latency and memory against them."""
        self.metrics.plugin_gauge(
            "plughost_plugin_memory_limit_bytes",
            "Memory limit of a plugin's calls.",
            lambda: {n: lim["memory_mb"] * MiB for n, lim in self._all_limits().items()},
        )
        self.metrics.plugin_gauge(
            "plughost_plugin_timeout_seconds",
            "Wall-clock limit of a plugin's calls.",
            lambda: {n: lim["timeout_s"] for n, lim in self._all_limits().items()},
        )
        self.metrics.plugin_gauge(
            "plughost_plugin_quarantined",
            "1 while a plugin is quarantined.",
            lambda: {
                n: float(self.quarantine.retry_after(n) is not None)
                for n in self.registry.list_plugins()
            },
        )

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
            image, mime_type, _ = validate_payload(payload, self._runner.limits)
        except InvalidInput as exc:
            raise Rejected(envelope("invalid_input", str(exc), plugin=plugin_name)) from exc
        check_image_type(image, mime_type, plugin_name)
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
        self,
        plugin_name: str,
        payload: Any,
        cancel: CancelToken | None = None,
        owner: str | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run one call for `owner` (a principal id; None: no client's);
        return `(result, {})` or `({}, envelope)`. Its metrics are recorded
        by the ToolRunner (`CallRecorder`); its outcome, as the client sees
        it and marked with its owner, joins the plugin's ring of recent outcomes."""
        retry = self.quarantine.retry_after(plugin_name)
        if retry is not None:
            refused = self._quarantined(plugin_name, retry)
            self.metrics.observe_call(plugin_name, "quarantined", 0.0)
            if owner is not None:
                self.metrics.observe_own(plugin_name, owner, "quarantined", 0.0)
            self.recent.add(plugin_name, 0.0, {}, refused, owner)
            return {}, refused
        self._warn_unchecked(plugin_name, payload)
        started = time.monotonic()
        token = cancel or CancelToken()
        try:
            self._runner.last_measured()  # nothing earlier on this thread counts
            with use_token(token):
                result, error = self._runner.run(plugin_name=plugin_name, payload=payload)
            seen = self._runner.last_measured()
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
        elapsed = time.monotonic() - started
        if owner is not None:
            peak = seen.get("peak_rss_mb")
            self.metrics.observe_own(
                plugin_name,
                owner,
                Envelope.of(error).reason if error else "success",
                elapsed,
                None if peak is None else int(peak * MiB),
            )
        self.recent.add(plugin_name, elapsed, result, error, owner)
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

    def _all_limits(self) -> dict[str, dict[str, float]]:
        """The clamped limits of every registered plugin, by name."""
        found = {}
        for name in self.registry.list_plugins():
            try:
                plugin = self.registry.get_plugin(name)
            except KeyError:  # unregistered since it was listed
                continue
            limits = self._runner.limits.clamp(plugin.manifest.plugin_limits)
            found[name] = {"timeout_s": limits.timeout_s, "memory_mb": limits.memory_mb}
        return found

    def describe(self, name: str, admin: bool = False, scope: str | None = None) -> dict[str, Any]:
        """Manifest, limits, state, metrics and quarantine of one plugin.

        What only the admin may see (`admin=True`): the environment's
        `detail` (the installer's output, host paths). Everyone else gets
        its status, reason code and a fixed message. `metrics` are every
        call's, or with `scope` (a client's principal id) that client's own
        calls' alone. Raises Rejected (unknown_plugin) for a name that is
        not registered.
        """
        try:
            plugin = self.registry.get_plugin(name)
        except KeyError:
            raise Rejected(unknown_plugin(name).to_dict()) from None
        limits = self._runner.limits.clamp(plugin.manifest.plugin_limits)
        status = self.registry.get_status(name)
        status.pop("environment")
        return {
            "name": name,
            "version": plugin.manifest.version,
            "description": plugin.manifest.description,
            "entrypoint": plugin.manifest.entrypoint,
            "source": plugin.source,
            "limits": {"timeout_s": limits.timeout_s, "memory_mb": limits.memory_mb},
            "dependencies": list(plugin.requirements.dependencies),
            "environment": self.registry.environment(name).public(admin),
            "options_schema": plugin.manifest.options,
            "state": status["state"],
            "metrics": (
                {k: v for k, v in status.items() if k not in ("name", "state")}
                if scope is None
                else self.metrics.own(name, scope)
            ),
            "quarantine": self.quarantine.status(name),
        }

    def list_plugins(self, admin: bool = False, scope: str | None = None) -> list[dict[str, Any]]:
        """`describe` of every plugin (the admin's view with `admin`, a
        client's own figures with `scope`)."""
        return [self.describe(name, admin, scope) for name in self.registry.list_plugins()]

    def load_errors(self, admin: bool = False) -> dict[str, Any]:
        """The plugins that failed to load: their count for everyone, and
        the messages (which name host paths and quote the plugin's files)
        for the admin, as `load_errors`."""
        errors = list(self.registry.load_errors)
        shown: dict[str, Any] = {"load_error_count": len(errors)}
        if admin:
            shown["load_errors"] = errors
        return shown

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
        for problem in self.registry.load_errors:
            log.warning("plugin not loaded: %s", problem)
        for gone in before - set(names):
            self.registry.unregister(gone)
        if self.preparation.started:
            self.preparation.start()  # the new plugins' environments
        return sorted(names)


__all__ = ["CallRecorder", "PluginManagementService"]
