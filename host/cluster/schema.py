"""The tables of a multi-node deployment, created once per database.

    plughost_jobs         the job records (the SQLite store's columns) plus
                          the dispatch: queue, Procrastinate job id, attempts,
                          the node holding it, completed runs; one job per
                          (owner, idempotency key), by a unique index
    plughost_nodes        every node: role, plugins (version, content hash,
                          queue) and its last heartbeat
    plughost_quarantine   per-plugin UNAVAILABLE streaks, shared by all nodes
    plughost_plugin_stats per-plugin state and call counts, shared by all nodes
    plughost_batches      batches of jobs (host/services/batchrows.py); each
                          item is a job row with its `batch_id`
    plughost_callbacks    the callback outbox, and plughost_secrets the secret
                          callbacks are signed with (host/services/callbackstore.py)

Procrastinate's own schema is applied first when it is missing. Both run
under an advisory lock, so nodes starting together do not race.
"""

from __future__ import annotations

from typing import Any

import psycopg
from procrastinate.schema import SchemaManager

from host.services.batchrows import batch_schema
from host.services.callbackstore import PG_TABLES

# An arbitrary key for pg_advisory_lock: "plughost" in ASCII.
SCHEMA_LOCK = 0x706C7567686F7374

TABLES = """
CREATE TABLE IF NOT EXISTS plughost_jobs (
    id TEXT PRIMARY KEY, plugin TEXT NOT NULL, status TEXT NOT NULL,
    created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT,
    result TEXT, error TEXT, payload TEXT, image BYTEA,
    owner TEXT NOT NULL DEFAULT 'anonymous', stored_bytes BIGINT NOT NULL DEFAULT 0,
    queue_job_id BIGINT, attempts INTEGER NOT NULL DEFAULT 0, node TEXT,
    completions INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS plughost_jobs_status ON plughost_jobs (status, created_at);
CREATE INDEX IF NOT EXISTS plughost_jobs_owner ON plughost_jobs (owner, created_at);
ALTER TABLE plughost_jobs ADD COLUMN IF NOT EXISTS idem_key TEXT;
ALTER TABLE plughost_jobs ADD COLUMN IF NOT EXISTS request_hash TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS plughost_jobs_idem ON plughost_jobs (owner, idem_key)
    WHERE idem_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS plughost_nodes (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_heartbeat TIMESTAMPTZ NOT NULL DEFAULT now(),
    concurrency INTEGER NOT NULL DEFAULT 0, running INTEGER NOT NULL DEFAULT 0,
    plugins JSONB NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS plughost_quarantine (
    plugin TEXT PRIMARY KEY, streak INTEGER NOT NULL DEFAULT 0, until TIMESTAMPTZ,
    total INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS plughost_plugin_stats (
    plugin TEXT PRIMARY KEY, state TEXT NOT NULL, success_count BIGINT NOT NULL DEFAULT 0,
    error_count BIGINT NOT NULL DEFAULT 0, total_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_ms DOUBLE PRECISION, last_used TEXT);
ALTER TABLE plughost_jobs ADD COLUMN IF NOT EXISTS batch_id TEXT;
""" + batch_schema("plughost_jobs", "plughost_batches")


def ensure_schema(url: str) -> None:
    """Create Procrastinate's schema and plughost's tables in `url` if missing.

    Raises psycopg.OperationalError when the database cannot be reached.
    """
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
        try:
            found: Any = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
            if found is None or found[0] is None:
                conn.execute(SchemaManager.get_schema())
            conn.execute(TABLES.encode())
            conn.execute(PG_TABLES.encode())
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
