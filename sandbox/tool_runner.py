"""ToolRunner: the single place where a plugin call becomes `(result, error)`.

    result, error = ToolRunner(catalog, sandbox).run("image_info", payload)
    result, error = ToolRunner().run("image_info", payload)   # SPEC section 3

Exactly one of the two is non-empty. No exception escapes `run`: bad input,
an unknown plugin, any plugin failure and a bug in the host itself all come
back as an error envelope (SPEC sections 3 to 5).

The sandbox knows nothing of the host: it reads plugins through
`PluginCatalog`, a protocol defined here that the host's registry fulfils,
and runs them in the `Sandbox` it is given. A server passes its own of
both. `ToolRunner()` with neither (the SPEC's library use) reads the
process-wide catalog the host registers (`set_default_catalog`; empty until
then) and starts a process-wide sandbox on its first call, closed at exit.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import json
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Protocol

from sandbox import trace
from sandbox.call import current_token
from sandbox.envelope import Envelope, unknown_plugin
from sandbox.host_paths import HostPaths
from sandbox.limits import HostLimits, PluginLimits
from sandbox.outcome import HostFailure, Outcome, State, Status
from sandbox.supervisor import CallSpec, Sandbox

ALLOWED_MIME_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/tiff"}
)


class RunnablePlugin(Protocol):
    """What the sandbox needs to know of a plugin to run it."""

    @property
    def name(self) -> str: ...
    @property
    def directory(self) -> Path: ...
    @property
    def entrypoint(self) -> str:
        """`module:attribute`, the module found in `directory`."""
        ...

    @property
    def limits(self) -> PluginLimits:
        """The plugin's own limits (clamped to the host's maxima for each call)."""
        ...

    @property
    def import_root(self) -> Path | None:
        """Where the entrypoint's module is imported from when not `directory`
        (an installed plugin package's parent); only `directory` is exposed."""
        ...

    def options_problem(self, options: dict[str, Any]) -> str | None:
        """What is wrong with a call's options (None: nothing)."""
        ...


class PluginCatalog(Protocol):
    """Where the ToolRunner finds plugins and records each finished call."""

    def get_plugin(self, name: str) -> RunnablePlugin:
        """The plugin called `name`. Raises KeyError for an unknown name."""
        ...

    def list_plugins(self) -> list[str]: ...

    def import_paths(self, name: str) -> tuple[str, ...]:
        """The plugin's own environment, searched after its directory.
        Raises PluginNotReady while it is not prepared."""
        ...

    def update_execution_metrics(
        self,
        plugin_name: str,
        state: State | None,
        elapsed_ms: float,
        had_error: bool,
        reason: str | None = None,
        peak_rss_mb: float | None = None,
    ) -> None:
        """Record one finished call: the state it leaves (None: unchanged), its
        time, its failure reason (None: success) and the peak memory the
        sandbox measured (None: it never reached a child)."""
        ...


class PluginNotReady(Exception):
    """A plugin that cannot be called (its environment is not prepared, or
    could not be). The message is what the client is told; `reason` the
    envelope's reason, `details` its details."""

    def __init__(
        self,
        message: str,
        reason: str = "environment_not_ready",
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.details = dict(details or {})


class InvalidInput(ValueError):
    """The payload is not something a plugin may be called with."""


def validate_payload(payload: Any, limits: HostLimits) -> tuple[bytes, str, dict[str, Any]]:
    """Check a payload; return `(image, mime_type, options)`. Raises InvalidInput."""
    if not isinstance(payload, dict):
        raise InvalidInput(f"payload must be a dict, got {type(payload).__name__}")
    unknown = set(payload) - {"image", "mime_type", "options"}
    if unknown:
        raise InvalidInput(f"payload has unknown fields: {', '.join(sorted(map(str, unknown)))}")
    image = payload.get("image")
    if isinstance(image, str):
        try:
            image = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput("field 'image' is not valid base64") from exc
    if isinstance(image, bytearray | memoryview):
        image = bytes(image)
    if not isinstance(image, bytes):
        raise InvalidInput("field 'image' is missing or not bytes")
    if not image:
        raise InvalidInput("field 'image' is empty")
    if len(image) > limits.max_image_bytes:
        raise InvalidInput(
            f"field 'image' is {len(image)} bytes, the limit is {limits.max_image_bytes}"
        )
    mime_type = payload.get("mime_type")
    if not isinstance(mime_type, str) or not mime_type:
        raise InvalidInput("field 'mime_type' is missing")
    if mime_type not in ALLOWED_MIME_TYPES:
        allowed = ", ".join(sorted(ALLOWED_MIME_TYPES))
        raise InvalidInput(f"field 'mime_type' {mime_type[:80]!r} is not one of {allowed}")
    options = payload.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise InvalidInput("field 'options' must be an object")
    try:
        json.dumps(options, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"field 'options' is not JSON: {exc}") from exc
    return image, mime_type, options


def _peak_rss_mb(outcome: Outcome) -> float | None:
    """The call's peak memory as the sandbox measured it (a success too)."""
    peak = outcome.details.get("peak_rss_mb")
    return float(peak) if isinstance(peak, int | float) else None


class _NoPlugins:
    """The catalog of a process in which the host registered none."""

    def get_plugin(self, name: str) -> RunnablePlugin:
        raise KeyError(name)

    def list_plugins(self) -> list[str]:
        return []

    def import_paths(self, name: str) -> tuple[str, ...]:
        return ()

    def update_execution_metrics(self, *args: Any, **kwargs: Any) -> None:
        pass


_default_catalog: PluginCatalog = _NoPlugins()
_default_sandbox: Sandbox | None = None
_default_lock = threading.Lock()
_measured = threading.local()  # ToolRunner.last_measured, per thread


def set_default_catalog(catalog: PluginCatalog) -> None:
    """The catalog `ToolRunner()` reads when given none (host.registry sets it)."""
    global _default_catalog
    _default_catalog = catalog


def default_sandbox() -> Sandbox:
    """The sandbox `ToolRunner()` runs calls in when given none: started on
    first use, closed (launcher reaped) when the process exits."""
    global _default_sandbox
    with _default_lock:
        if _default_sandbox is None:
            _default_sandbox = Sandbox()
            atexit.register(_default_sandbox.close)
        return _default_sandbox


class ToolRunner:
    """Runs the plugins of `catalog`, each call in its own child of `sandbox`."""

    def __init__(
        self,
        catalog: PluginCatalog | None = None,
        sandbox: Sandbox | None = None,
        limits: HostLimits | None = None,
    ) -> None:
        self.catalog = catalog if catalog is not None else _default_catalog
        self._sandbox = sandbox
        self.limits = limits or HostLimits()

    @property
    def sandbox(self) -> Sandbox:
        """The sandbox this runner's calls run in."""
        if self._sandbox is None:
            self._sandbox = default_sandbox()
        return self._sandbox

    def run(self, plugin_name: str, payload: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run `plugin_name` on `payload`; return `(result, {})` or `({}, envelope)`.
        What the sandbox measured of it waits in `last_measured` (this thread's)."""
        result, error, seen = self.measure(plugin_name, payload)
        _measured.seen = seen
        return result, error

    @staticmethod
    def last_measured() -> dict[str, Any]:
        """What the sandbox measured of this thread's last `run` (as
        `measure` gives it), once: taken, it is gone ({} if none waits)."""
        seen: dict[str, Any] = getattr(_measured, "seen", {})
        _measured.seen = {}
        return seen

    def measure(
        self, plugin_name: str, payload: Any
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """`run`, plus what the sandbox measured of the call (elapsed_ms,
        peak_rss_mb and cgroup_peak_mb where measured; `output`, what the
        plugin printed: `{"stdout": text, "stderr": text}`, the first 64 KiB
        of each): for the operator and the plugin author, never a client.

        The call's state and time are recorded in the catalog exactly once,
        here, for every call that reached a registered plugin.
        """
        started = time.monotonic()
        trace.mark("host.begin")
        record = False
        call: CallSpec | Envelope | None = None
        state: State | None = None
        reason: str | None = "internal"
        peak: float | None = None
        try:
            try:
                plugin = self.catalog.get_plugin(plugin_name)
            except KeyError:
                return {}, unknown_plugin(plugin_name, self.catalog.list_plugins()).to_dict(), {}
            call = self._prepare(plugin, payload)
            if isinstance(call, Envelope):  # refused before any child starts
                return {}, call.to_dict(), {}
            record = True
            trace.mark("host.runner_prepare")
            outcome = self.sandbox.execute(call, current_token())
            trace.mark("host.execute_returned")
            state, peak = outcome.state, _peak_rss_mb(outcome)
            seen = _measured_of(outcome, call)
            if outcome.status is Status.SUCCESS and outcome.result is not None:
                reason = None
                return outcome.result, {}, seen
            reason = outcome.reason or "internal"
            return {}, self._envelope(plugin_name, outcome, call).to_dict(), seen
        except HostFailure as exc:
            state, reason = None, "internal"
            message = f"plugin host failed: {exc.message}"
            details = _host_paths(call).scrub_details(exc.details)
            return {}, Envelope.build("internal", message, plugin_name, details).to_dict(), {}
        # The boundary of the contract: a host-side bug becomes an envelope too.
        except Exception as exc:  # noqa: BLE001
            record = record or plugin_name in self.catalog.list_plugins()
            state, reason = None, "internal"
            failure = Envelope.build(
                "internal",
                f"plugin host failed: {type(exc).__name__}",
                plugin_name if isinstance(plugin_name, str) else None,
                traceback=traceback.format_exc(),
            )
            return {}, failure.to_dict(), {}
        finally:
            if record:
                elapsed_ms = (time.monotonic() - started) * 1000
                self.catalog.update_execution_metrics(
                    plugin_name, state, elapsed_ms, reason is not None, reason, peak
                )
            trace.mark("host.end")

    def _prepare(self, plugin: RunnablePlugin, payload: Any) -> Envelope | CallSpec:
        """The call to make, or the envelope refusing it before any child
        starts: a bad payload, options against the plugin's schema, or an
        environment not ready (it is never prepared inside a call)."""
        try:
            image, mime_type, options = validate_payload(payload, self.limits)
            problem = plugin.options_problem(options)
            if problem is not None:
                raise InvalidInput(problem)
        except InvalidInput as exc:
            return Envelope.build("invalid_input", str(exc), plugin.name)
        try:
            import_paths = self.catalog.import_paths(plugin.name)
        except PluginNotReady as exc:
            return Envelope.build(exc.reason, str(exc), plugin.name, exc.details)
        root = str(plugin.import_root) if plugin.import_root is not None else None
        return CallSpec(
            plugin=plugin.name,
            plugin_dir=str(plugin.directory),
            entrypoint=plugin.entrypoint,
            limits=self.limits.clamp(plugin.limits),
            image=image,
            mime_type=mime_type,
            options=options,
            import_paths=import_paths,
            import_root=root,
        )

    @staticmethod
    def _envelope(plugin_name: str, outcome: Outcome, call: CallSpec) -> Envelope:
        # The child's text, untrusted and partly written by faulthandler,
        # shows the plugin's frames and no host path (sandbox.host_paths).
        paths = _host_paths(call)
        return Envelope.build(
            outcome.reason or "internal",
            paths.scrub(outcome.message),
            plugin_name,
            paths.scrub_details(outcome.details),
            paths.scrub(outcome.traceback),
        )


def _measured_of(outcome: Outcome, call: CallSpec) -> dict[str, Any]:
    """The call's figures and, when it printed anything, its `output`."""
    if not outcome.output:
        return outcome.details
    paths = _host_paths(call)
    output = {name: paths.scrub(text) for name, text in outcome.output.items()}
    return {**outcome.details, "output": output}


def _host_paths(call: CallSpec | Envelope | None) -> HostPaths:
    """The filter of `call`'s text: its plugin's directory and packages."""
    if not isinstance(call, CallSpec):
        return HostPaths("")
    return HostPaths(call.plugin_dir, (*call.import_paths, call.import_root or ""))
