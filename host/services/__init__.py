"""The service layers: API -> AnalysisService -> JobManagementService ->
PluginManagementService -> ToolRunner; `build_services` wires them for a
server's settings (host/services/build.py)."""

from host.services.analysis import AnalysisService
from host.services.build import Services, build_services
from host.services.jobs import JobLimits, JobManagementService
from host.services.plugins import PluginManagementService
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
    "Job",
    "JobLimits",
    "JobManagementService",
    "JobPage",
    "JobStatus",
    "MemoryJobStore",
    "PluginManagementService",
    "SQLiteJobStore",
    "Services",
    "build_services",
]
