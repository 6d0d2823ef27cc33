"""What every node is built on: its sandbox and its discovered plugins.

    Settings ──> Sandbox (the node's one launcher, isolation, prewarm)
             ──> PluginRegistry (plugin environments, then the plugins found
                 in `plugins_dirs`, with the overrides)

A single server (host/services/build.py), an API node
(host/cluster/services.py) and a worker node (`plughost worker`) alike.
"""

from __future__ import annotations

from host.config import Settings
from host.discovery import discover
from host.preparation import environment_store
from host.registry import PluginRegistry
from host.statedir import make_private_dir
from sandbox.supervisor import Sandbox


def node_plugins(settings: Settings) -> tuple[PluginRegistry, Sandbox]:
    """A node's sandbox and the plugins discovered in `settings.plugins_dirs`
    (with their environments), as every node builds them: a single server,
    an API node and a worker node of a multi-node deployment alike. Load
    errors are kept in the registry's `load_errors`.

    Raises ValueError for an unknown isolation level or layer name (before
    anything is discovered).
    """
    sandbox = Sandbox(
        isolation=settings.isolation, disabled=settings.disable_layers, prewarm=settings.prewarm
    )
    registry = PluginRegistry()
    make_private_dir(settings.state_dir)
    registry.environments = environment_store(settings.plugin_envs, settings.allow_source_builds)
    discover(registry, settings.plugins_dirs, settings.plugin_overrides)
    return registry, sandbox
