"""ToolRunner: the single place where a plugin call becomes `(result, error)`.

    result, error = ToolRunner().run("image_info", payload)

Exactly one of the two is non-empty. No exception escapes `run`: bad input,
an unknown plugin, any plugin failure and a bug in the host itself all come
back as an error envelope (SPEC sections 3 to 5).
"""

from __future__ import annotations

import atexit
import base64
import binascii
import json
import threading
import time
import traceback
from typing import Any

from host.registry import PluginRegistry, get_registry
from sandbox.envelope import make_envelope
from sandbox.limits import HostLimits
from sandbox.outcome import Outcome, Status
from sandbox.supervisor import CallSpec, Sandbox

ALLOWED_MIME_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/tiff"}
)

_shared_sandbox: Sandbox | None = None
_shared_lock = threading.Lock()


def shared_sandbox() -> Sandbox:
    """The process-wide sandbox (one launcher for every ToolRunner)."""
    global _shared_sandbox
    with _shared_lock:
        if _shared_sandbox is None:
            _shared_sandbox = Sandbox()
            # Close the launcher and reap it when the host exits: nobody else would.
            atexit.register(_shared_sandbox.close)
        return _shared_sandbox


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


class ToolRunner:
    """Runs plugins by name, each call in its own sandboxed child process."""

    def __init__(
        self,
        sandbox: Sandbox | None = None,
        limits: HostLimits | None = None,
        registry: PluginRegistry | None = None,
    ) -> None:
        self._sandbox = sandbox
        self.limits = limits or HostLimits()
        self._registry = registry
        self._last = threading.local()  # per thread: the call this thread made last

    def last_peak_rss_mb(self) -> float | None:
        """Peak memory of the last call `run` made in this thread, as the
        sandbox measured it (also for a success, whose result carries none);
        None when that call never reached a sandbox."""
        peak = getattr(self._last, "peak_rss_mb", None)
        return float(peak) if isinstance(peak, int | float) else None

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = shared_sandbox()
        return self._sandbox

    def run(self, plugin_name: str, payload: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run `plugin_name` on `payload`; return `(result, {})` or `({}, envelope)`."""
        registry = self._registry or get_registry()
        started = time.monotonic()
        record = False
        state = None
        had_error = True
        self._last.peak_rss_mb = None
        try:
            try:
                plugin = registry.get_plugin(plugin_name)
            except KeyError:
                return {}, make_envelope(
                    "unknown_plugin",
                    f"no plugin named {str(plugin_name)[:100]!r} is registered",
                    plugin=None,
                    details={"available": registry.list_plugins()[:50]},
                )
            try:
                image, mime_type, options = validate_payload(payload, self.limits)
            except InvalidInput as exc:
                return {}, make_envelope("invalid_input", str(exc), plugin=plugin_name)
            record = True
            call = CallSpec(
                plugin=plugin_name,
                plugin_dir=str(plugin.directory),
                entrypoint=plugin.manifest.entrypoint,
                limits=self.limits.clamp(plugin.manifest.plugin_limits),
                image=image,
                mime_type=mime_type,
                options=options,
            )
            outcome = self.sandbox.execute(call)
            self._last.peak_rss_mb = outcome.details.get("peak_rss_mb")
            state = outcome.state
            if outcome.status is Status.SUCCESS and outcome.result is not None:
                had_error = False
                return outcome.result, {}
            return {}, self._envelope(plugin_name, outcome)
        # The boundary of the contract: a host-side bug becomes an envelope too.
        except Exception as exc:  # noqa: BLE001
            record = record or plugin_name in registry.list_plugins()
            state = None
            return {}, make_envelope(
                "internal",
                f"plugin host failed: {type(exc).__name__}",
                plugin=plugin_name if isinstance(plugin_name, str) else None,
                traceback=traceback.format_exc(),
            )
        finally:
            if record:
                elapsed_ms = (time.monotonic() - started) * 1000
                registry.update_execution_metrics(plugin_name, state, elapsed_ms, had_error)

    @staticmethod
    def _envelope(plugin_name: str, outcome: Outcome) -> dict[str, Any]:
        reason = outcome.reason or "internal"
        return make_envelope(
            reason,
            outcome.message,
            plugin=plugin_name,
            details=outcome.details,
            traceback=outcome.traceback,
        )
