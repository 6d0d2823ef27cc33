"""What each console page shows, gathered from the services as plain data.

Pages are rendered from these dictionaries by the templates; nothing here
knows HTML. The figures are the host's metrics (`host.metrics`): call
counts by outcome, and p50/p95 of latency and peak memory ranked among the
recent calls' own figures (not estimated from the buckets `/metrics`
exports, whose interpolation invents values a plugin never took).

Each plugin is shown in one condition (`condition`): the registry's state
of its last call, unless its environment keeps every call from running
(preparing, not prepared, failed), with what that means and what to do.

What a client is shown is its own. The admin sees everything; a client sees
the recent outcomes of its own calls only (messages and result keys echo
inputs), and no host paths, installer output or load errors: an environment
is shown by its status (a plugin whose packages are not ready is unavailable
for that reason), the message of an outcome the host decided by its
reason's description, the self-check and the load errors by their counts.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from host.console import states
from host.metrics import WINDOW, Histogram, PluginFigures
from host.services import JobManagementService, JobStatus, PluginManagementService
from host.services.batches import BatchService
from sandbox.outcome import Origin, reason_of

MiB = 1024 * 1024
PAGE_SIZE = 50
# A job's result on its page; the API serves it whole.
MAX_SHOWN_CHARS = 64 * 1024


class ConsoleServices(Protocol):
    """What the console reads: the API's `Services`."""

    plugins: PluginManagementService
    jobs: JobManagementService

    def nodes(self) -> list[dict[str, Any]]: ...


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value / MiB, 1)


def _fraction(value: float | None, limit: float) -> float:
    """`value / limit` in [0, 1] for a chart; 0 without a value."""
    if value is None or limit <= 0:
        return 0.0
    return max(0.0, min(1.0, value / limit))


def spark(histogram: Histogram) -> list[dict[str, Any]]:
    """Observations per bucket (not cumulative), each with its height in [0, 1]
    relative to the fullest bucket, for a small bar chart."""
    counts, below = [], 0
    for cumulative in histogram.counts:
        counts.append(cumulative - below)
        below = cumulative
    counts.append(histogram.count - below)
    top = max(counts) or 1
    bounds = [*histogram.bounds, float("inf")]
    return [
        {"le": bound, "count": count, "height": count / top}
        for bound, count in zip(bounds, counts, strict=True)
    ]


def figures_row(figures: PluginFigures, limits: dict[str, float]) -> dict[str, Any]:
    """Calls, error rate, latency and memory of one plugin against its limits."""
    timeout_s = float(limits["timeout_s"])
    memory_bytes = float(limits["memory_mb"]) * MiB
    p50, p95 = figures.latency_quantile(0.5), figures.latency_quantile(0.95)
    peak95 = figures.peak_quantile(0.95)
    total = figures.total
    return {
        "calls": total,
        "errors": figures.errors,
        "error_rate": round(100 * figures.errors / total, 1) if total else None,
        "outcomes": dict(sorted(figures.calls.items())),
        "p50_ms": _ms(p50),
        "p95_ms": _ms(p95),
        "latency_fraction": _fraction(p95, timeout_s),
        "p50_fraction": _fraction(p50, timeout_s),
        "peak_mb": _mb(figures.max_peak_bytes),
        "peak95_mb": _mb(peak95),
        "memory_fraction": _fraction(figures.max_peak_bytes, memory_bytes),
        "memory95_fraction": _fraction(peak95, memory_bytes),
        "ranked": len(figures.recent.seconds),
        "measured": len(figures.recent.peaks),
        "latency_spark": spark(figures.latency),
        "memory_spark": spark(figures.memory),
    }


def plugin_row(
    plugins: PluginManagementService, name: str, admin: bool, scope: str | None
) -> dict[str, Any]:
    """One plugin as the overview lists it, for the admin or a client: the
    environment's installer output (`detail`) is the admin's alone, and the
    figures are those of `scope`'s own calls (None: everyone's, the admin's)."""
    described = plugins.describe(name, admin, scope)
    figures = plugins.metrics.figures(name, scope)
    return {
        **described,
        **figures_row(figures, described["limits"]),
        "condition": states.condition(described),
    }


def overview(
    svc: ConsoleServices, self_check: dict[str, Any] | None, admin: bool, scope: str | None
) -> dict[str, Any]:
    """Every plugin's row (its figures those of `scope`'s calls), the
    queue, the isolation summary and the nodes; the load errors (and the
    nodes' hosts) for the admin, their count for a client."""
    plugins = svc.plugins
    rows = []
    for name in plugins.registry.list_plugins():
        try:
            rows.append(plugin_row(plugins, name, admin, scope))
        except KeyError:  # unregistered by a reload since it was listed
            continue
    protections = plugins.protections()
    return {
        "plugins": rows,
        "load_errors": [],
        **plugins.load_errors(admin),  # the messages for the admin, a count for everyone
        "jobs": svc.jobs.stats(),
        "layers_active": sum(protections.values()),
        "layers_missing": [name for name, on in protections.items() if not on],
        "self_check": self_check,
        "quarantined": [r["name"] for r in rows if r["quarantine"]["quarantined"]],
        "nodes": svc.nodes() if admin else [],
        "badges": states.legend(),
        "window": WINDOW,
    }


def as_client_sees(entry: dict[str, Any]) -> dict[str, Any]:
    """A recent outcome of a client's own call, as the console shows it to
    that client: when the host failed or refused the call on its own side (a
    5xx reason decided by the host: an environment not ready, a host
    failure), whose message can carry host paths or installer output, the
    message becomes the reason's description and the details the reason alone."""
    error = entry.get("error")
    if not error:
        return entry
    reason = str(error.get("details", {}).get("reason", "internal"))
    decided = reason_of(reason)
    if decided.origin is not Origin.HOST or decided.http_status < 500:
        return entry
    kept = {k: v for k, v in error["details"].items() if k in ("reason", "retry_after_s")}
    return {**entry, "error": {**error, "message": decided.description, "details": kept}}


def plugin_page(
    plugins: PluginManagementService,
    name: str,
    scope: str | None,
    admin: bool,
    names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Manifest, limits, options schema, figures and recent outcomes of
    `name`: those of `scope`'s calls (None: everyone's, for the admin, with
    their owners' names from `names`, owner id -> name).
    Raises Rejected (unknown_plugin) for a name that is not registered."""
    row = plugin_row(plugins, name, admin, scope)
    manifest = plugins.registry.get_plugin(name).manifest
    schema = manifest.options  # the manifest's optional `[options]` JSON Schema
    recent = plugins.recent.of(name, scope)
    return {
        **row,
        "dependencies": list(getattr(manifest, "dependencies", []) or []),
        "options_schema": json.dumps(schema, indent=2, sort_keys=True) if schema else None,
        "recent": (
            [{**e, "owner_name": (names or {}).get(str(e.get("owner")))} for e in recent]
            if admin
            else [as_client_sees(entry) for entry in recent]
        ),
        "badges": states.legend(),
        "window": WINDOW,
    }


def isolation(
    svc: ConsoleServices,
    level: str,
    disabled: list[str],
    self_check: dict[str, Any] | None,
    admin: bool,
) -> dict[str, Any]:
    """Active and missing isolation layers, and the start-up self-check: its
    failures' evidence (which can name host files) for the admin alone."""
    protections = svc.plugins.protections()
    if self_check is not None and not admin:
        self_check = {**self_check, "failed_cases": {}, "benign_failures": []}
    return {
        "level": level,
        "disabled": disabled,
        "layers": sorted(protections.items()),
        "active": [name for name, on in protections.items() if on],
        "missing": [name for name, on in protections.items() if not on],
        "self_check": self_check,
    }


def _as_seen(job: dict[str, Any], scope: str | None, names: dict[str, str]) -> dict[str, Any]:
    """A job's public view for `scope` (None: the admin): the admin sees
    whose it is (`owner_name`, from the configured names); a client, only
    ever shown its own jobs, sees a host-decided error as `as_client_sees`."""
    if scope is None:
        return {**job, "owner_name": names.get(str(job.get("owner")))}
    return as_client_sees(job)


def jobs_page(
    jobs: JobManagementService,
    scope: str | None,
    status: JobStatus | None,
    plugin: str | None,
    offset: int,
    names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A page of the jobs `scope` may see (None: everyone's, with their
    owners' names from `names`, owner id -> name), newest first."""
    page = jobs.list_jobs(scope, status, plugin, PAGE_SIZE, offset)
    listed = []
    for document in page.documents:
        job = _as_seen(json.loads(document), scope, names or {})
        result = job.get("result") or {}
        job["result_keys"] = sorted(map(str, result))[:20] if isinstance(result, dict) else []
        job.pop("result", None)  # a result can be large; the API serves it whole
        listed.append(job)
    return {
        "jobs": listed,
        "total": page.total,
        "offset": offset,
        "next_offset": page.next_offset,
        "previous_offset": max(0, offset - PAGE_SIZE) if offset else None,
        "statuses": [s.value for s in JobStatus],
    }


def job_page(
    jobs: JobManagementService, job_id: str, scope: str | None, names: dict[str, str]
) -> dict[str, Any]:
    """One job `scope` may see (None: any, with its owner's name from
    `names`), its result as indented JSON cut at `MAX_SHOWN_CHARS`. Raises
    JobNotFound for another owner's job as for an unknown id."""
    job = _as_seen(json.loads(jobs.job_document(job_id, scope)), scope, names)
    result = job.pop("result", None)
    shown = None if result is None else json.dumps(result, indent=2, sort_keys=True)
    cut = shown is not None and len(shown) > MAX_SHOWN_CHARS
    return {
        **job,
        "result_json": shown[:MAX_SHOWN_CHARS] if shown is not None else None,
        "result_cut": cut,
        "error_json": json.dumps(job["error"], indent=2) if job.get("error") else None,
    }


def batches_page(
    batches: BatchService, scope: str | None, offset: int, names: dict[str, str]
) -> dict[str, Any]:
    """A page of the batches `scope` may see (None: everyone's, with their
    owners' names from `names`), newest first, without their items."""
    found, total = batches.list_batches(scope, PAGE_SIZE, offset)
    listed = [{**b, "owner_name": names.get(str(b["owner"]))} for b in found]
    end = offset + len(found)
    return {
        "batches": listed,
        "total": total,
        "next_offset": end if end < total else None,
        "previous_offset": max(0, offset - PAGE_SIZE) if offset else None,
    }


def batch_page(
    batches: BatchService,
    batch_id: str,
    scope: str | None,
    offset: int,
    max_bytes: int,
    names: dict[str, str],
) -> dict[str, Any]:
    """One batch `scope` may see (None: any), with a page of its items as
    GET /v1/batches/{id} gives it (`max_bytes` of them at most; an item's
    host-decided error as its client sees it, its result's keys only).
    Raises ServiceError `not_found` for another owner's batch as for none."""
    view = json.loads(batches.document(batch_id, scope, PAGE_SIZE, offset, max_bytes))
    items = []
    for item in view.pop("items"):
        shown = as_client_sees(item) if scope is not None else item
        result = shown.pop("result", None)
        shown["result_keys"] = sorted(map(str, result))[:20] if isinstance(result, dict) else []
        items.append(shown)
    return {
        **view,
        "owner_name": names.get(str(view["owner"])),
        "items": items,
        "previous_offset": max(0, offset - PAGE_SIZE) if offset else None,
    }
