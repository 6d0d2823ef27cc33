"""Health and metrics: `GET /healthz` (the process is up), `GET /readyz`
(calls work: plugins loaded, the start-up self-check passed, calls set up;
503 with the reasons otherwise)
and `GET /metrics` (Prometheus text format)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from host.api.deps import CLIENT, ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def public_check(check: dict[str, Any]) -> dict[str, Any]:
    """The self-check's report as anyone may read it: the failed probes by
    name and the count of failed benign calls, not their evidence."""
    shown = {k: v for k, v in check.items() if k != "public_headline"}
    return {
        **shown,
        "headline": check["public_headline"],
        "failed_cases": sorted(check["failed_cases"]),
        "benign_failures": len(check["benign_failures"]),
    }


@router.get("/readyz", summary="Ready to serve, and which isolation layers are active")
def readyz(request: Request, svc: ServicesDep) -> JSONResponse:
    """200 while calls work: plugins are loaded, the start-up self-check
    passed (a check that failed is a host that cannot contain, or cannot set
    calls up at all) and calls are being set up; else 503 with `reasons`."""
    protections = svc.plugins.protections()
    plugins = svc.plugins.registry.list_plugins()
    check = request.app.state.self_check
    reasons = []
    if not plugins:
        reasons.append("no plugin is loaded")
    if check is not None and not check["ok"]:
        reasons.append(f"the containment self-check failed: {check['public_headline']}")
    if problem := svc.plugins.sandbox.setup_problem():
        reasons.append(problem)
    ready = not reasons
    body = {
        "ready": ready,
        "reasons": reasons,
        "plugins": len(plugins),
        "isolation": protections,
        # Which probes failed, not why: their evidence can name host files
        # (the admin reads it in the console's isolation page and the log).
        "self_check": None if check is None else public_check(check),
        "jobs": svc.jobs.stats(),
        # Idle prewarmed children, so a crash-suite run can tell them from leftovers.
        "warm_uids": svc.plugins.warm_uids(),
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse, dependencies=CLIENT)
def metrics(svc: ServicesDep) -> PlainTextResponse:
    return PlainTextResponse(svc.plugins.metrics.render(), media_type="text/plain; version=0.0.4")
