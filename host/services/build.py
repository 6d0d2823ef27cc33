"""Wiring: the services of one server, built from its settings.

    Settings ──> node_plugins (host/services/node.py): Sandbox (the server's one launcher,
             │   isolation, prewarm) and PluginRegistry (discovered plugins), as every
             │   node builds them
             ──> PluginManagementService(registry, sandbox)
             ──> JobManagementService(plugins, job store, runner: LocalPool)
             │     └─ callbacks: CallbackService (outbox in the job store, deliverer thread)
             ──> AnalysisService(jobs)
             ──> BatchService(plugins, jobs) (host/services/batches.py)

Everything that runs calls gets the server's sandbox from here; nothing
builds one of its own (the start-up self-check included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from host.config import Settings
from host.services.analysis import AnalysisService
from host.services.batches import BatchService
from host.services.callbacks import callback_service, file_secret
from host.services.jobs import JobLimits, JobManagementService
from host.services.node import node_plugins
from host.services.plugins import PluginManagementService
from host.services.store import JobStore, SQLiteJobStore


@dataclass
class Services:
    """Everything the routes need, built once per app."""

    plugins: PluginManagementService
    jobs: JobManagementService
    analysis: AnalysisService
    batches: BatchService = field(init=False)

    def __post_init__(self) -> None:
        self.batches = BatchService(self.plugins, self.jobs)

    def nodes(self) -> list[dict[str, Any]]:
        """The nodes of a multi-node deployment, each a dict with at least
        `name`, `state` and `last_seen`; empty on a single node (the console
        shows its nodes section only when there are some)."""
        return self.jobs.nodes()


def job_limits(settings: Settings) -> JobLimits:
    """The job store's bounds from `settings`."""
    return JobLimits(
        retention_s=settings.job_retention_s,
        max_jobs_per_client=settings.max_jobs_per_client,
        max_stored_bytes_per_client=settings.max_stored_bytes_per_client,
        max_list_bytes=settings.max_list_bytes,
        max_db_bytes=settings.max_db_bytes,
    )


def plugin_service(settings: Settings) -> PluginManagementService:
    """The server's sandbox and discovered plugins, with the quarantine settings.

    Raises ValueError for an unknown isolation level or layer name.
    """
    plugins = PluginManagementService(*node_plugins(settings))
    plugins.quarantine.threshold = settings.quarantine_threshold
    plugins.quarantine.cooldown_s = settings.quarantine_cooldown_s
    return plugins


def build_services(settings: Settings, store: JobStore | None = None) -> Services:
    """Discover plugins and wire the layers for `settings`."""
    if settings.database_url and store is None:
        from host.cluster.services import build_cluster_services

        return Services(*build_cluster_services(settings, job_limits(settings)))
    plugins = plugin_service(settings)
    jobs = JobManagementService(
        plugins,
        store or SQLiteJobStore(settings.job_db, synchronous=settings.db_sync),
        workers=settings.workers,
        queue_size=settings.queue_size,
        limits=job_limits(settings),
    )
    jobs.callbacks = callback_service(settings, jobs.store, file_secret(settings.state_dir))
    jobs.callbacks.start()
    return Services(plugins, jobs, AnalysisService(jobs, settings.default_plugin))


__all__ = ["Services", "build_services", "job_limits", "plugin_service"]
