"""plughost on many machines: PostgreSQL as the system of record and
Procrastinate dispatching jobs from API nodes to sandbox (worker) nodes.
See docs/scale-out.md."""

from host.cluster.dispatch import ClusterPluginService, NoWorker, ProcrastinateDispatch
from host.cluster.nodes import NodeBook, content_hash, queue_name
from host.cluster.worker import WorkerNode, WorkerOptions, run_worker

__all__ = [
    "ClusterPluginService",
    "NoWorker",
    "NodeBook",
    "ProcrastinateDispatch",
    "WorkerNode",
    "WorkerOptions",
    "content_hash",
    "queue_name",
    "run_worker",
]
