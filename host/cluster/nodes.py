"""Nodes of a multi-node deployment and the plugins each one can run.

Every node has a unique name (host, pid and a random part: a restarted
process is a new node) and a row in `plughost_nodes` it refreshes every
heartbeat. A worker node lists its plugins with version and content hash;
a job is queued on the queue of the exact plugin (name + hash) the API
accepted it for, and only workers that have that plugin listen there.

    plugin directory --content_hash--> digest --queue_name--> "3f2a9c01d4e7.image_info"
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from host.cluster.pgstore import PgJobStore
from host.registry import PluginRegistry

log = logging.getLogger("plughost.nodes")
SKIPPED_DIRS = frozenset({"__pycache__", ".venv", ".git"})
# Procrastinate listens on "procrastinate_queue_v1#<queue>": 63 bytes at most.
MAX_QUEUE_LEN = 40


def content_hash(directory: Path) -> str:
    """SHA-256 over the plugin's files (relative path and bytes, in order),
    caches and environments left out."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part in SKIPPED_DIRS for part in relative.parts) or not path.is_file():
            continue
        digest.update(str(relative).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def queue_name(plugin: str, digest: str) -> str:
    """The Procrastinate queue of one plugin version."""
    return f"{digest[:12]}.{plugin}"[:MAX_QUEUE_LEN]


def inventory(registry: PluginRegistry) -> dict[str, dict[str, str]]:
    """`{name: {"version", "hash", "queue"}}` of every registered plugin."""
    found = {}
    for name in registry.list_plugins():
        plugin = registry.get_plugin(name)
        digest = content_hash(plugin.directory)
        found[name] = {
            "version": plugin.manifest.version,
            "hash": digest,
            "queue": queue_name(name, digest),
        }
    return found


def node_name(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class NodeBook:
    """This node's row in `plughost_nodes`, and what it knows of the others."""

    def __init__(self, store: PgJobStore, role: str, stalled_after_s: float) -> None:
        self.store = store
        self.role = role
        self.name = node_name(role)
        self.stalled_after_s = stalled_after_s
        self._serves: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    def register(self, plugins: dict[str, dict[str, str]], concurrency: int) -> None:
        """Write this node's row (again, after a database outage)."""
        with self.store.connection() as conn:
            conn.execute(
                "INSERT INTO plughost_nodes (name, role, host, pid, concurrency, plugins) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET "
                "last_heartbeat = now(), plugins = EXCLUDED.plugins, "
                "concurrency = EXCLUDED.concurrency",
                (
                    self.name,
                    self.role,
                    socket.gethostname(),
                    os.getpid(),
                    concurrency,
                    json.dumps(plugins),
                ),
            )

    def heartbeat(self, running: int) -> bool:
        """Refresh this node's heartbeat; False if its row is gone (pruned)."""
        with self.store.connection() as conn:
            cursor = conn.execute(
                "UPDATE plughost_nodes SET last_heartbeat = now(), running = %s WHERE name = %s",
                (running, self.name),
            )
        return cursor.rowcount == 1

    def leave(self) -> None:
        with self.store.connection() as conn:
            conn.execute("DELETE FROM plughost_nodes WHERE name = %s", (self.name,))

    def serves(self, queue: str, cache_s: float = 1.0) -> bool:
        """Whether a live worker listens on `queue` (a yes is trusted for `cache_s`)."""
        now = time.monotonic()
        with self._lock:
            cached = self._serves.get(queue)
            if cached is not None and now - cached[0] < cache_s:
                return True
        plugin = queue.split(".", 1)[1]
        with self.store.connection() as conn:
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM plughost_nodes WHERE role = 'worker' "
                "AND last_heartbeat > now() - make_interval(secs => %s) "
                "AND plugins -> %s ->> 'queue' = %s)",
                (self.stalled_after_s, plugin, queue),
            ).fetchone()
        found = bool(row and row[0])
        if found:
            with self._lock:
                self._serves[queue] = (now, found)
        return found

    def nodes(self) -> list[dict[str, Any]]:
        """Every node: name, role, host, last heartbeat (ISO, also as
        `last_seen`), seconds since, concurrency, running jobs, plugins,
        healthy (heartbeat fresh) and `state` ("healthy" or "silent")."""
        with self.store.connection() as conn:
            rows = conn.execute(
                "SELECT name, role, host, pid, last_heartbeat, "
                "EXTRACT(EPOCH FROM now() - last_heartbeat), concurrency, running, plugins "
                "FROM plughost_nodes ORDER BY role, name"
            ).fetchall()
        return [
            {
                "name": r[0],
                "role": r[1],
                "host": r[2],
                "pid": r[3],
                "last_heartbeat": r[4].isoformat(),
                "heartbeat_age_s": round(float(r[5]), 3),
                "concurrency": r[6],
                "running": r[7],
                "plugins": r[8],
                "healthy": float(r[5]) < self.stalled_after_s,
                # What the console shows of every node.
                "state": "healthy" if float(r[5]) < self.stalled_after_s else "silent",
                "last_seen": r[4].isoformat(),
            }
            for r in rows
        ]

    def prune(self, older_than_s: float) -> int:
        """Forget nodes silent for `older_than_s`; return how many."""
        with self.store.connection() as conn:
            cursor = conn.execute(
                "DELETE FROM plughost_nodes WHERE last_heartbeat < now() - "
                "make_interval(secs => %s)",
                (older_than_s,),
            )
        return cursor.rowcount


def serving_nodes(nodes: Iterable[dict[str, Any]], plugin: str, digest: str) -> list[str]:
    """Names of the healthy workers that have `plugin` with content `digest`."""
    return [
        n["name"]
        for n in nodes
        if n["role"] == "worker"
        and n["healthy"]
        and n["plugins"].get(plugin, {}).get("hash") == digest
    ]
