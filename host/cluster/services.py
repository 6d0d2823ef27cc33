"""The service layers of an API node of a multi-node deployment."""

from __future__ import annotations

import logging
import time

import procrastinate
import psycopg

from host.cluster.dispatch import ClusterPluginService, ProcrastinateDispatch, make_app
from host.cluster.nodes import NodeBook, inventory
from host.cluster.pgstore import PgJobStore, open_pool
from host.cluster.schema import ensure_schema
from host.cluster.shared import SharedQuarantine, SharedStats
from host.config import Settings
from host.services.analysis import AnalysisService
from host.services.callbacks import callback_service, database_secret
from host.services.jobs import JobLimits, JobManagementService
from host.services.node import node_plugins

log = logging.getLogger("plughost.cluster")
SCHEMA_WAIT_S = 60.0


def wait_for_schema(url: str, deadline_s: float = SCHEMA_WAIT_S) -> None:
    """Create the schema, retrying while the database is unreachable.

    Raises psycopg.OperationalError after `deadline_s`.
    """
    deadline = time.monotonic() + deadline_s
    pause = 0.2
    while True:
        try:
            ensure_schema(url)
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("database not reachable yet (%s); retrying", exc)
            time.sleep(pause)
            pause = min(5.0, pause * 2)


def build_cluster_services(
    settings: Settings, limits: JobLimits
) -> tuple[ClusterPluginService, JobManagementService, AnalysisService]:
    """Plugins, jobs and analysis of an API node on `settings.database_url`."""
    url = settings.database_url
    assert url is not None
    wait_for_schema(url)
    pool = open_pool(url, max_size=max(4, settings.max_connections // 16))
    store = PgJobStore(pool)
    registry, sandbox = node_plugins(settings)
    plugins = ClusterPluginService(
        registry,
        sandbox,
        quarantine=SharedQuarantine(
            store, settings.quarantine_threshold, settings.quarantine_cooldown_s
        ),
        stats=SharedStats(store),
        nodes=NodeBook(store, "api", settings.stalled_after_s),
    )
    plugins.inventory = inventory(registry)
    app = make_app(procrastinate.SyncPsycopgConnector(conninfo=url))
    runner = ProcrastinateDispatch(plugins, store, app, url)
    jobs = JobManagementService(plugins, store, limits=limits, runner=runner)
    # Every API node delivers callbacks too, signing with the database's secret.
    jobs.callbacks = callback_service(settings, store, database_secret(store))
    jobs.callbacks.start()
    return plugins, jobs, AnalysisService(jobs, settings.default_plugin)
