"""The service layers: API -> AnalysisService -> JobManagementService ->
PluginManagementService -> ToolRunner."""

from host.services.analysis import AnalysisService
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
]
