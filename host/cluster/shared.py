"""Quarantine and plugin statistics kept in PostgreSQL, so every node sees
the same: three UNAVAILABLE outcomes on three different nodes quarantine
the plugin everywhere, and any API node reports calls run on any worker.

Both fail open when the database is unreachable: a quarantine that cannot
be read lets the call run (the sandbox still contains it), a count that
cannot be written is logged and dropped. A job is never lost for either.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from host.cluster.pgstore import DatabaseUnavailable, PgJobStore
from host.quarantine import QuarantineBook
from sandbox.outcome import State, reason_of

log = logging.getLogger("plughost.shared")


class SharedQuarantine(QuarantineBook):
    """A `QuarantineBook` whose records live in `plughost_quarantine`."""

    def __init__(self, store: PgJobStore, threshold: int = 3, cooldown_s: float = 60.0) -> None:
        super().__init__(threshold, cooldown_s)
        self.store = store

    def retry_after(self, plugin: str) -> float | None:
        try:
            with self.store.connection() as conn:
                row = conn.execute(
                    "SELECT EXTRACT(EPOCH FROM until - now()) FROM plughost_quarantine "
                    "WHERE plugin = %s AND until > now()",
                    (plugin,),
                ).fetchone()
        except DatabaseUnavailable as exc:
            log.warning("quarantine of %s unreadable, not applied: %s", plugin, exc)
            return None
        return None if row is None else float(row[0])

    def record(self, plugin: str, unavailable: bool) -> bool:
        try:
            return self._record(plugin, unavailable)
        except DatabaseUnavailable as exc:
            log.warning("quarantine outcome of %s not recorded: %s", plugin, exc)
            return False

    def _record(self, plugin: str, unavailable: bool) -> bool:
        with self.store.connection() as conn:
            if not unavailable:
                conn.execute(
                    "UPDATE plughost_quarantine SET streak = 0 WHERE plugin = %s AND streak > 0",
                    (plugin,),
                )
                return False
            # A quarantine that ran out starts a new streak.
            row = conn.execute(
                "INSERT INTO plughost_quarantine AS q (plugin, streak) VALUES (%s, 1) "
                "ON CONFLICT (plugin) DO UPDATE SET "
                "streak = CASE WHEN q.until <= now() THEN 1 ELSE q.streak + 1 END, "
                "until = CASE WHEN q.until <= now() THEN NULL ELSE q.until END "
                "RETURNING streak, until",
                (plugin,),
            ).fetchone()
            assert row is not None
            if row[0] < self.threshold or row[1] is not None:
                return False
            cursor = conn.execute(
                "UPDATE plughost_quarantine SET until = now() + make_interval(secs => %s), "
                "total = total + 1 WHERE plugin = %s AND until IS NULL",
                (self.cooldown_s, plugin),
            )
            return cursor.rowcount == 1

    def reset(self, plugin: str) -> bool:
        with self.store.connection() as conn:
            cursor = conn.execute(
                "UPDATE plughost_quarantine SET streak = 0, until = NULL WHERE plugin = %s "
                "RETURNING until",
                (plugin,),
            )
        return cursor.rowcount == 1

    def status(self, plugin: str) -> dict[str, Any]:
        with self.store.connection() as conn:
            row = conn.execute(
                "SELECT streak, total, CASE WHEN until > now() "
                "THEN EXTRACT(EPOCH FROM until - now()) END FROM plughost_quarantine "
                "WHERE plugin = %s",
                (plugin,),
            ).fetchone()
        streak, total, remaining = row if row is not None else (0, 0, None)
        return {
            "quarantined": remaining is not None,
            "retry_after_s": None if remaining is None else round(float(remaining), 1),
            "unavailable_streak": streak,
            "times_quarantined": total,
        }


class SharedStats:
    """Per-plugin state and call counts in `plughost_plugin_stats`."""

    def __init__(self, store: PgJobStore) -> None:
        self.store = store

    def record(self, plugin: str, reason: str | None, elapsed_ms: float) -> None:
        """Count one call that ended with `reason` (None: success)."""
        state = State.SUCCESS if reason is None else reason_of(reason).state
        failed = reason is not None
        try:
            with self.store.connection() as conn:
                conn.execute(
                    "INSERT INTO plughost_plugin_stats AS s (plugin, state, success_count, "
                    "error_count, total_ms, last_ms, last_used) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (plugin) DO UPDATE SET "
                    "state = CASE WHEN %s THEN EXCLUDED.state ELSE s.state END, "
                    "success_count = s.success_count + EXCLUDED.success_count, "
                    "error_count = s.error_count + EXCLUDED.error_count, "
                    "total_ms = s.total_ms + EXCLUDED.total_ms, last_ms = EXCLUDED.last_ms, "
                    "last_used = EXCLUDED.last_used",
                    (
                        plugin,
                        (state or State.IDLE).value,
                        int(not failed),
                        int(failed),
                        elapsed_ms,
                        elapsed_ms,
                        datetime.now(UTC).isoformat(),
                        state is not None,
                    ),
                )
        except DatabaseUnavailable as exc:
            log.warning("call of %s not counted: %s", plugin, exc)

    def status(self, plugin: str) -> dict[str, Any] | None:
        """The registry's status fields for `plugin`, over every node; None if never run."""
        with self.store.connection() as conn:
            row = conn.execute(
                "SELECT state, success_count, error_count, total_ms, last_ms, last_used "
                "FROM plughost_plugin_stats WHERE plugin = %s",
                (plugin,),
            ).fetchone()
        if row is None:
            return None
        calls = row[1] + row[2]
        return {
            "state": row[0],
            "success_count": row[1],
            "error_count": row[2],
            "last_execution_time_ms": row[4],
            "avg_execution_time_ms": row[3] / calls if calls else None,
            "last_used": row[5],
        }
