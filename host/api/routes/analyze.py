"""`POST /v1/analyze` (JSON, base64 image) and `POST /v1/analyze/upload`
(multipart): queue the analysis as a job and wait for it, without blocking
the event loop: the submission (quota reads, pruning, in cluster mode the
database's round trips) and a late recording run on the store's threads
(`in_store_thread`), and the wait is `asyncio.wrap_future`."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from host.api.auth import Principal
from host.api.bodies import (
    ANALYZE_BODY_DOC,
    EXAMPLE_BODY,
    IDEMPOTENCY_DOC,
    analyze_body,
    idempotency_key,
    parse_form_options,
)
from host.api.deps import (
    CLIENT,
    JSON_ERRORS,
    CallerDep,
    ServicesDep,
    SettingsDep,
    in_store_thread,
)
from host.api.errors import error_response
from host.errors import JobNotFound, Rejected, envelope
from host.services.analysis import ANALYZE_WAIT_S, job_outcome
from host.services.build import Services
from host.services.jobrows import FINISHED, Job

router = APIRouter(tags=["analyze"])


# How long a job found gone as its wait ended may take to hand its end to its
# future (the thread that ended it is past its last store work).
ENDED_WAIT_S = 10.0


class AnalyzeResponse(BaseModel):
    result: dict[str, Any]
    plugin: str
    job_id: str


async def _wait_for_end(request: Request, ended: asyncio.Future[Job]) -> Job:
    """The job once `ended`; TimeoutError at the route's deadline, or once
    the stopping server ends the waits (`app.state.waits`: uvicorn would
    cancel this request soon after, with a bare 500)."""
    # A wait of its own: the deadline gives up on it, never on `ended`.
    wait: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def open_(_: object) -> None:
        if not wait.done():
            wait.set_result(None)

    ended.add_done_callback(open_)
    waits: set[asyncio.Future[None]] | None = getattr(request.app.state, "waits", None)
    if waits is not None:
        waits.add(wait)
    try:
        await asyncio.wait_for(wait, ANALYZE_WAIT_S)
    finally:
        if waits is not None:
            waits.discard(wait)
        ended.remove_done_callback(open_)
    return ended.result()


def _unfinished(job: Job) -> JSONResponse:
    """202: the job goes on; it is followed at GET /v1/jobs/{id}."""
    return JSONResponse(
        {"job": job.public(), "links": {"self": f"/v1/jobs/{job.id}"}}, status_code=202
    )


async def _analyze(
    request: Request, svc: Services, caller: Principal, plugin: str | None, payload: Any
) -> JSONResponse:
    """With an `Idempotency-Key` the client used before, the answer the
    first request gives: the key's job is waited for as that request waits
    (its result, its error, or 202 once the deadline passes)."""
    key = idempotency_key(request)

    def submit() -> tuple[Job, Future[Job]]:
        return svc.analysis.submit(plugin, payload, caller.id, waited=True, key=key)

    if svc.analysis.jobs.waits_in_memory(key):
        # No store work here: the job's own thread checks its owner's quota as
        # it starts. A hand-over to a store thread and back cost the server's
        # process 0.2 ms of its 1.5 ms a request.
        job, future = submit()
    else:
        job, future = await in_store_thread(request, submit)
    ended = asyncio.wrap_future(future)
    try:
        job = await _wait_for_end(request, ended)
    except TimeoutError:
        try:
            job = await in_store_thread(
                request, svc.analysis.stop_waiting, job
            )  # stored now, to be followed
        except JobNotFound:
            # It ended in memory as the wait ended (refused for its owner's
            # quota as it started): its future says how.
            job = await asyncio.wait_for(ended, ENDED_WAIT_S)
        else:
            ended.cancel()  # nobody waits for it now (the job goes on)
            return _unfinished(job)
    if job.status not in FINISHED:  # a known key's job no runner here follows
        return _unfinished(job)
    result, error = job_outcome(job)
    if error:
        return error_response(error["error"])
    return JSONResponse({"result": result, "plugin": job.plugin, "job_id": job.id})


@router.post(
    "/v1/analyze",
    response_model=AnalyzeResponse,
    responses=JSON_ERRORS,
    summary="Run a plugin on a base64-encoded image and wait for the result",
    openapi_extra={**ANALYZE_BODY_DOC, **IDEMPOTENCY_DOC},
)
async def analyze(request: Request, caller: CallerDep) -> JSONResponse:
    # One dependency (the caller's token) rather than three: FastAPI's
    # resolution of each costs this busiest route more than the work itself.
    body = await analyze_body(request)
    if body.callback_url is not None:
        raise Rejected(
            envelope(
                "invalid_input",
                "callback_url is for POST /v1/jobs: POST /v1/analyze answers with the result",
                field="callback_url",
            )
        )
    services: Services = request.app.state.services
    return await _analyze(request, services, caller, body.plugin, body.payload())


@router.post(
    "/v1/analyze/upload",
    response_model=AnalyzeResponse,
    responses=JSON_ERRORS,
    dependencies=CLIENT,
    summary="Run a plugin on an uploaded image file (multipart) and wait for the result",
    openapi_extra=IDEMPOTENCY_DOC,
)
async def analyze_upload(
    request: Request,
    svc: ServicesDep,
    settings: SettingsDep,
    caller: CallerDep,
    file: Annotated[UploadFile, File(description="the image file")],
    plugin: Annotated[
        str | None,
        Form(
            description="the plugin to run; default: the host's default plugin",
            examples=[EXAMPLE_BODY["plugin"]],
        ),
    ] = None,
    mime_type: Annotated[
        str | None,
        Form(
            description="the image's type; default: the file part's own Content-Type",
            examples=[EXAMPLE_BODY["mime_type"]],
        ),
    ] = None,
    options: Annotated[
        str, Form(description="the plugin's options as a JSON object", examples=["{}"])
    ] = "{}",
) -> JSONResponse:
    parsed = parse_form_options(options, settings)
    image = await file.read()
    payload = {"image": image, "mime_type": mime_type or file.content_type, "options": parsed}
    return await _analyze(request, svc, caller, plugin, payload)
