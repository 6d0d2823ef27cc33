"""plughost on many machines: PostgreSQL as the system of record and
Procrastinate dispatching jobs from API nodes to sandbox (worker) nodes.
See docs/scale-out.md."""

from host.cluster.dispatch import ClusterJobService, ClusterPluginService, NoWorker
from host.cluster.nodes import NodeBook, content_hash, queue_name
from host.cluster.worker import WorkerNode, WorkerOptions, run_worker

__all__ = [
    "ClusterJobService",
    "ClusterPluginService",
    "NoWorker",
    "NodeBook",
    "WorkerNode",
    "WorkerOptions",
    "content_hash",
    "queue_name",
    "run_worker",
]
