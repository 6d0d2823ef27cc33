"""The last few outcomes of each plugin, as clients saw them, for the console.

A ring per plugin (`size` entries) and at most `max_plugins` rings: memory
stays bounded however many calls are made. An entry holds the public part
of an envelope only (`error`, never `_internal`) and, for a success, the
names of the result's top-level keys, not the result; and who made the call
(`owner`, a principal id such as `client-<16 hex>`, never a token; None for
calls no client made, such as the CLI's). Error messages and result keys
often echo a call's input, so a client is shown only its own entries
(`of(plugin, scope)`); the admin all of them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from datetime import UTC, datetime
from typing import Any

RING_SIZE = 20
MAX_PLUGINS = 512
MAX_KEYS = 20


class RecentOutcomes:
    """Thread-safe rings of recent outcomes by plugin, newest last."""

    def __init__(self, size: int = RING_SIZE, max_plugins: int = MAX_PLUGINS) -> None:
        self.size = size
        self.max_plugins = max_plugins
        self._lock = threading.Lock()
        self._rings: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()

    def add(
        self,
        plugin: str,
        seconds: float,
        result: dict[str, Any],
        error: dict[str, Any],
        owner: str | None = None,
    ) -> None:
        """Remember one call of `plugin` made by `owner`: `(result, error)` as
        the ToolRunner returned them. Only `error["error"]` is kept of an envelope."""
        public = error.get("error") if error else None
        entry = {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "outcome": public["details"].get("reason", "unknown") if public else "success",
            "elapsed_ms": round(seconds * 1000, 1),
            "error": dict(public) if public else None,
            "result_keys": sorted(map(str, result))[:MAX_KEYS] if result else [],
            "owner": owner,
        }
        with self._lock:
            ring = self._rings.get(plugin)
            if ring is None:
                if len(self._rings) >= self.max_plugins:
                    self._rings.popitem(last=False)  # the plugin seen longest ago
                ring = self._rings[plugin] = deque(maxlen=self.size)
            self._rings.move_to_end(plugin)
            ring.append(entry)

    def of(self, plugin: str, scope: str | None = None) -> list[dict[str, Any]]:
        """`plugin`'s recent outcomes, newest first: those of calls `scope`
        made (None: everyone's, for the admin)."""
        with self._lock:
            entries = list(reversed(self._rings.get(plugin, ())))
        return [e for e in entries if scope is None or e["owner"] == scope]
