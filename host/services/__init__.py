"""The service layers: API -> AnalysisService -> JobManagementService ->
PluginManagementService -> ToolRunner; `build_services` wires them for a
server's settings (host/services/build.py), on the sandbox and plugins
`node_plugins` gives every node. Where jobs run is a `JobRunner`'s (by
default a `LocalPool`); a job's end is recorded by `record_finished`, and
a batch's by `batch_ended` (host/services/batches.py)."""

from host.services.analysis import AnalysisService
from host.services.batches import BatchService, batch_ended
from host.services.build import Services, build_services
from host.services.finished import record_finished
from host.services.jobs import JobLimits, JobManagementService
from host.services.node import node_plugins
from host.services.plugins import PluginManagementService
from host.services.runners import JobRunner, LocalPool
from host.services.store import (
    ANONYMOUS,
    Job,
    JobPage,
    JobStatus,
    MemoryJobStore,
    SQLiteJobStore,
)

__all__ = [
    "ANONYMOUS",
    "AnalysisService",
    "BatchService",
    "Job",
    "JobLimits",
    "JobManagementService",
    "JobPage",
    "JobRunner",
    "JobStatus",
    "LocalPool",
    "MemoryJobStore",
    "PluginManagementService",
    "SQLiteJobStore",
    "Services",
    "batch_ended",
    "build_services",
    "node_plugins",
    "record_finished",
]
