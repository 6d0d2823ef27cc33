"""The FastAPI application: HTTP in front of AnalysisService and friends.

Routes never run sandbox work on the event loop: analyses are queued in the
job pool and awaited through `asyncio.wrap_future`, and routes that touch the
job store are plain `def` routes, which FastAPI runs in its thread pool.
"""

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field

from host import __version__
from host.api.auth import Principal, admin_principal, client_principal
from host.api.bodies import ANALYZE_BODY_DOC, AnalyzeBodyDep, parse_form_options
from host.api.console import console_router
from host.api.errors import error_response, install_handlers, responses
from host.api.middleware import BodySizeLimit
from host.config import Settings
from host.crashsuite import self_check
from host.discovery import discover
from host.privileges import drop_to
from host.services import (
    AnalysisService,
    JobLimits,
    JobManagementService,
    JobStatus,
    PluginManagementService,
    SQLiteJobStore,
)
from host.services.analysis import ANALYZE_WAIT_S, job_outcome
from host.services.plugins import ToolRunner
from host.services.store import Job, JobStore

JSON_ERRORS = responses(400, 401, 404, 413, 429, 500, 503)
log = logging.getLogger("plughost.api")


@dataclass
class Services:
    """Everything the routes need, built once per app."""

    plugins: PluginManagementService
    jobs: JobManagementService
    analysis: AnalysisService

    def nodes(self) -> list[dict[str, Any]]:
        """The nodes of a multi-node deployment, each a dict with at least
        `name`, `state` and `last_seen`; empty on a single node (the console
        shows its nodes section only when there are some)."""
        return []


def job_limits(settings: Settings) -> JobLimits:
    """The job store's bounds from `settings`."""
    return JobLimits(
        retention_s=settings.job_retention_s,
        max_jobs_per_client=settings.max_jobs_per_client,
        max_stored_bytes_per_client=settings.max_stored_bytes_per_client,
        max_list_bytes=settings.max_list_bytes,
        max_db_bytes=settings.max_db_bytes,
    )


def build_services(settings: Settings, store: JobStore | None = None) -> Services:
    """Discover plugins and wire the layers for `settings`."""
    sandbox = PluginManagementService.make_sandbox(
        settings.isolation, settings.disable_layers, settings.prewarm
    )
    plugins = PluginManagementService(ToolRunner(sandbox=sandbox))
    plugins.quarantine.threshold = settings.quarantine_threshold
    plugins.quarantine.cooldown_s = settings.quarantine_cooldown_s
    discover(plugins.registry, settings.plugins_dirs, settings.plugin_overrides)
    jobs = JobManagementService(
        plugins,
        store or SQLiteJobStore(settings.job_db),
        workers=settings.workers,
        queue_size=settings.queue_size,
        limits=job_limits(settings),
    )
    return Services(plugins, jobs, AnalysisService(jobs, settings.default_plugin))


class AnalyzeResponse(BaseModel):
    result: dict[str, Any]
    plugin: str
    job_id: str


class JobModel(BaseModel):
    id: str
    plugin: str
    status: JobStatus
    created_at: str
    started_at: str | None
    finished_at: str | None
    owner: str = Field(description="principal that created the job")
    result: dict[str, Any] | None
    error: dict[str, Any] | None


class JobList(BaseModel):
    jobs: list[JobModel]
    total: int
    limit: int
    offset: int
    next_offset: int | None = Field(description="offset of the next page; null on the last")
    truncated: bool = Field(description="the page hit max_list_bytes before `limit` jobs")


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    """The plughost HTTP API. `services` defaults to `build_services(settings)`."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if services is None:
            app.state.services = await asyncio.to_thread(build_services, settings)
        protections = await asyncio.to_thread(app.state.services.plugins.protections)
        log.info(
            "plughost %s: isolation %s; layers active: %s; missing or off: %s",
            __version__,
            settings.isolation,
            ", ".join(name for name, on in protections.items() if on),
            ", ".join(name for name, on in protections.items() if not on) or "none",
        )
        if settings.self_check:
            report = await asyncio.to_thread(self_check)
            app.state.self_check = {
                "ok": report.ok,
                **report.summary(),
                "failed_cases": {c.name: c.problems for c in report.failed},
                "benign_failures": report.benign_failures,
                "case_verdicts": [
                    {"name": c.name, "category": c.category, "verdict": c.verdict}
                    for c in report.cases
                ],
            }
            if report.ok:
                log.info("containment self-check passed: %d probes", len(report.cases))
            else:
                log.error("containment self-check failed: %s", app.state.self_check)
                if settings.require_containment:
                    await asyncio.to_thread(app.state.services.jobs.shutdown)
                    raise RuntimeError("containment self-check failed; refusing to serve")
        if settings.user is None and os.geteuid() == 0:
            log.warning("the HTTP server runs as root; set user (--user) to serve unprivileged")
        if settings.user is not None:
            svc = app.state.services
            drop_to(settings.user, [Path(settings.job_db).parent, *svc.plugins.sandbox_paths()])
            log.info("serving as user %s; calls still start from the root launcher", settings.user)
        yield
        await asyncio.to_thread(app.state.services.jobs.shutdown)
        if services is None:  # built here, so stopped here
            await asyncio.to_thread(app.state.services.plugins.close)

    # Swagger UI and ReDoc served from the package's own assets: /docs works
    # on a host with no way out to a CDN.
    app = FastAPIOffline(
        title="plughost",
        version=__version__,
        description="Sandboxed host for untrusted image-analysis plugins.",
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.settings = settings
    app.state.self_check = None
    install_handlers(app)
    app.include_router(console_router(settings))
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)

    def get_services(request: Request) -> Services:
        found: Services = request.app.state.services
        return found

    ServicesDep = Annotated[Services, Depends(get_services)]
    require_client = client_principal(settings)  # one callable, so one call per request
    CallerDep = Annotated[Principal, Depends(require_client)]
    client = [Depends(require_client)]
    admin = [Depends(admin_principal(settings))]

    async def _analyze(
        svc: Services, caller: Principal, plugin: str | None, payload: Any
    ) -> JSONResponse:
        job, future = svc.analysis.submit(plugin, payload, caller.id)
        try:
            job = await asyncio.wait_for(asyncio.wrap_future(future), ANALYZE_WAIT_S)
        except TimeoutError:
            return JSONResponse(
                {"job": job.public(), "links": {"self": f"/v1/jobs/{job.id}"}}, status_code=202
            )
        result, error = job_outcome(job)
        if error:
            return error_response(error["error"])
        return JSONResponse({"result": result, "plugin": job.plugin, "job_id": job.id})

    @app.post(
        "/v1/analyze",
        response_model=AnalyzeResponse,
        responses=JSON_ERRORS,
        dependencies=client,
        summary="Run a plugin on a base64-encoded image and wait for the result",
        openapi_extra=ANALYZE_BODY_DOC,
    )
    async def analyze(body: AnalyzeBodyDep, svc: ServicesDep, caller: CallerDep) -> JSONResponse:
        return await _analyze(svc, caller, body.plugin, body.payload())

    @app.post(
        "/v1/analyze/upload",
        response_model=AnalyzeResponse,
        responses=JSON_ERRORS,
        dependencies=client,
        summary="Run a plugin on an uploaded image file (multipart) and wait for the result",
    )
    async def analyze_upload(
        svc: ServicesDep,
        caller: CallerDep,
        file: Annotated[UploadFile, File(description="the image file")],
        plugin: Annotated[str | None, Form()] = None,
        mime_type: Annotated[str | None, Form(description="default: the part's type")] = None,
        options: Annotated[str, Form(description="plugin options as a JSON object")] = "{}",
    ) -> JSONResponse:
        parsed = parse_form_options(options, settings)
        image = await file.read()
        payload = {"image": image, "mime_type": mime_type or file.content_type, "options": parsed}
        return await _analyze(svc, caller, plugin, payload)

    @app.post(
        "/v1/jobs",
        status_code=202,
        responses=JSON_ERRORS,
        dependencies=client,
        summary="Queue an analysis; poll GET /v1/jobs/{id} for its result",
        openapi_extra=ANALYZE_BODY_DOC,
    )
    def create_job(body: AnalyzeBodyDep, svc: ServicesDep, caller: CallerDep) -> JSONResponse:
        job, _ = svc.analysis.submit(body.plugin, body.payload(), caller.id)
        return JSONResponse(
            {"job": job.public(), "links": {"self": f"/v1/jobs/{job.id}"}},
            status_code=202,
            headers={"Location": f"/v1/jobs/{job.id}"},
        )

    @app.get(
        "/v1/jobs",
        response_model=JobList,
        responses=JSON_ERRORS,
        summary="The caller's jobs (the admin's: everyone's), newest first, in bounded pages",
    )
    def list_jobs(
        svc: ServicesDep,
        caller: CallerDep,
        status: JobStatus | None = None,
        plugin: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> Response:
        page = svc.jobs.list_jobs(caller.scope, status, plugin, limit, offset)
        # The stored documents are spliced in as they are: parsing and
        # re-serializing results would cost many times the page's size.
        tail = json.dumps(
            {
                "total": page.total,
                "limit": limit,
                "offset": offset,
                "next_offset": page.next_offset,
                "truncated": page.truncated,
            },
            separators=(",", ":"),
        )
        body = '{"jobs":[' + ",".join(page.documents) + "]," + tail[1:]
        return Response(body, media_type="application/json")

    @app.get("/v1/jobs/{job_id}", response_model=JobModel, responses=JSON_ERRORS)
    def get_job(job_id: str, svc: ServicesDep, caller: CallerDep) -> Response:
        document = svc.jobs.job_document(job_id, caller.scope)
        return Response(document, media_type="application/json")

    @app.delete(
        "/v1/jobs/{job_id}",
        response_model=JobModel,
        responses=responses(401, 404, 409, 500),
        summary="Cancel a job: a queued job never runs, a running sandbox is killed",
    )
    def cancel_job(job_id: str, svc: ServicesDep, caller: CallerDep) -> dict[str, Any]:
        job: Job = svc.jobs.cancel_job(job_id, caller.scope)
        return job.public()

    @app.get("/v1/plugins", responses=JSON_ERRORS, dependencies=client)
    def list_plugins(svc: ServicesDep) -> dict[str, Any]:
        return {
            "plugins": svc.plugins.list_plugins(),
            "load_errors": svc.plugins.registry.load_errors,
        }

    @app.get("/v1/plugins/{name}", responses=JSON_ERRORS, dependencies=client)
    def get_plugin(name: str, svc: ServicesDep) -> dict[str, Any]:
        return svc.plugins.describe(name)

    @app.post(
        "/v1/admin/plugins/{name}/quarantine/reset",
        responses=responses(401, 403, 404),
        dependencies=admin,
        summary="Lift a plugin's quarantine",
    )
    def reset_quarantine(name: str, svc: ServicesDep) -> dict[str, Any]:
        return svc.plugins.reset_quarantine(name)

    @app.post(
        "/v1/admin/reload",
        responses=responses(401, 403),
        dependencies=admin,
        summary="Discover plugins again",
    )
    def reload_plugins(svc: ServicesDep) -> dict[str, Any]:
        names = svc.plugins.reload(settings.plugins_dirs, settings.plugin_overrides)
        return {"plugins": names, "load_errors": svc.plugins.registry.load_errors}

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Ready to serve, and which isolation layers are active")
    def readyz(request: Request, svc: ServicesDep) -> JSONResponse:
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

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=client)
    def metrics(svc: ServicesDep) -> PlainTextResponse:
        return PlainTextResponse(
            svc.plugins.metrics.render(), media_type="text/plain; version=0.0.4"
        )

    return app
