"""The service layers: API -> AnalysisService -> JobManagementService ->
PluginManagementService -> ToolRunner."""

from host.services.analysis import AnalysisService
from host.services.jobs import JobManagementService
from host.services.plugins import PluginManagementService
from host.services.store import Job, JobStatus, MemoryJobStore, SQLiteJobStore

__all__ = [
    "AnalysisService",
    "Job",
    "JobManagementService",
    "JobStatus",
    "MemoryJobStore",
    "PluginManagementService",
    "SQLiteJobStore",
]
