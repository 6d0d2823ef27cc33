"""Preparing the registered plugins' environments, outside any call.

`prepare_all` runs in the foreground for `plughost plugins prepare`,
`plughost run` and `plughost check`; `BackgroundPreparation` runs it on a
thread when the server starts or reloads, so the API answers at once and a
plugin whose environment is still being prepared is refused with
`environment_not_ready` (503) instead of being run half-ready.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from host.bytecode import compile_plugin
from host.environments import EnvironmentStore, EnvState, EnvStatus, Progress
from host.registry import PluginRegistry

log = logging.getLogger("plughost.environments")


def environment_store(
    env_dir: str | Path, allow_source_builds: Iterable[str] = ()
) -> EnvironmentStore:
    """The store under `env_dir`, created private to the host's user but
    readable by the call uids (they only ever see it bound into their root)."""
    root = Path(env_dir)
    root.mkdir(parents=True, exist_ok=True, mode=0o755)
    return EnvironmentStore(root, allow_source_builds)


def prepare_all(
    registry: PluginRegistry,
    progress: Progress = lambda _line: None,
    names: Iterable[str] | None = None,
    refresh: bool = False,
    stopping: Callable[[], bool] = lambda: False,
) -> dict[str, EnvState]:
    """Compile the modules of every plugin in `names` (default: all) and
    prepare the environment of each that declares packages; then collect
    the environments none uses. Returns the state reached per plugin that
    declares packages. Once `stopping()` is true, no further plugin is
    begun and nothing is collected."""
    chosen = sorted(names if names is not None else registry.list_plugins())
    for name in chosen:
        if stopping():
            return {}
        compile_plugin(registry.get_plugin(name).directory)
    store = registry.environments
    if store is None:
        return {}
    states: dict[str, EnvState] = {}
    for name in chosen:
        plugin = registry.get_plugin(name)
        if plugin.requirements.empty:
            continue
        if stopping():
            return states
        states[name] = store.prepare(name, plugin.requirements, progress, refresh)
    in_use = [
        store.key_for(name, registry.get_plugin(name).requirements)
        for name in registry.list_plugins()
    ]
    for removed in store.collect(in_use):
        progress(f"removed the unused environment {removed}")
    return states


class BackgroundPreparation:
    """`prepare_all` on a thread of its own, one run at a time; progress goes
    to the log, and `registry.environment(name)` tells each plugin's state."""

    def __init__(self, registry: PluginRegistry, on_done: Callable[[], None] = lambda: None):
        self.registry = registry
        self._on_done = on_done
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._again = False
        self._stopping = threading.Event()
        self.started = False

    def start(self) -> None:
        """Start a run, or ask the running one to go round once more (a reload)."""
        with self._lock:
            self.started = True
            if self._thread is not None and self._thread.is_alive():
                self._again = True
                return
            self._thread = threading.Thread(target=self._run, name="plughost-prepare", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                states = prepare_all(self.registry, log.info, stopping=self._stopping.is_set)
            except Exception:  # a bug here must not take the server down
                log.exception("preparing the plugins' environments failed")
                states = {}
            for name, state in states.items():
                if state.status is EnvStatus.FAILED:
                    log.error("plugin %s: %s", name, state.message)
            self._on_done()
            with self._lock:
                if not self._again or self._stopping.is_set():
                    return
                self._again = False

    def stop(self, timeout_s: float) -> bool:
        """Begin no further plugin, and wait up to `timeout_s` for the one
        being prepared (the server is stopping); True when none is left."""
        self._stopping.set()
        return self.join(timeout_s)

    def join(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the current run; True when none is left."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            return not thread.is_alive()
        return True
