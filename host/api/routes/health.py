"""Health and metrics: `GET /healthz` (the process is up), `GET /readyz`
(ready to serve: plugins, isolation layers, the start-up self-check, jobs)
and `GET /metrics` (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from host.api.deps import CLIENT, ServicesDep, SettingsDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Ready to serve, and which isolation layers are active")
def readyz(request: Request, svc: ServicesDep, settings: SettingsDep) -> JSONResponse:
    protections = svc.plugins.protections()
    plugins = svc.plugins.registry.list_plugins()
    check = request.app.state.self_check
    contained = check is None or check["ok"]
    ready = bool(plugins) and (contained or not settings.require_containment)
    body = {
        "ready": ready,
        "plugins": len(plugins),
        "isolation": protections,
        "self_check": check,
        "jobs": svc.jobs.stats(),
        # Idle prewarmed children, so a crash-suite run can tell them from leftovers.
        "warm_uids": svc.plugins.warm_uids(),
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse, dependencies=CLIENT)
def metrics(svc: ServicesDep) -> PlainTextResponse:
    return PlainTextResponse(svc.plugins.metrics.render(), media_type="text/plain; version=0.0.4")
