"""Jobs: `POST /v1/jobs` (202, async), `GET /v1/jobs` (filtered, bounded
pages), `GET /v1/jobs/{id}`, `DELETE /v1/jobs/{id}` (cancel). A client sees
and cancels only its own jobs; the admin sees everyone's.

Every route runs its store work on the store's threads (`in_store_thread`),
never on the event loop, nor in the thread pool the other routes share.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from host.api.bodies import (
    CALLBACK_DOC,
    IDEMPOTENCY_DOC,
    JOB_BODY_DOC,
    AnalyzeBodyDep,
    idempotency_key,
)
from host.api.deps import CLIENT, JSON_ERRORS, MAX_OFFSET, CallerDep, ServicesDep, in_store_thread
from host.api.errors import responses
from host.services import JobStatus
from host.services.jobrows import JobPage
from host.services.store import Job

router = APIRouter(tags=["jobs"])


class CallbackAttempt(BaseModel):
    at: str = Field(description="when the attempt started (ISO-8601 UTC)")
    duration_ms: float
    status: int | None = Field(default=None, description="the receiver's HTTP status, if any")
    error: str | None = Field(
        default=None,
        description="why the attempt failed, in words (a refused destination, a timeout, "
        "a non-2xx status, a redirect, which is never followed); never the response body",
    )


class CallbackView(BaseModel):
    url: str
    state: str = Field(description="PENDING, DELIVERING, DELIVERED or FAILED")
    attempts: list[CallbackAttempt]


class JobModel(BaseModel):
    id: str
    plugin: str
    status: JobStatus
    created_at: str
    started_at: str | None
    finished_at: str | None
    owner: str = Field(description="the client (its token's id) that created the job")
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    callback: CallbackView | None = Field(
        default=None,
        description="the job's completion callback, when it was given a callback_url",
    )


class JobList(BaseModel):
    jobs: list[JobModel]
    total: int
    limit: int
    offset: int
    next_offset: int | None = Field(description="offset of the next page; null on the last")
    truncated: bool = Field(
        description="the page reached the host's size cap for one page before `limit` jobs; "
        "the rest follow from `next_offset`"
    )


@router.post(
    "/v1/jobs",
    status_code=202,
    responses=JSON_ERRORS,
    dependencies=CLIENT,
    summary="Queue an analysis; poll GET /v1/jobs/{id} for its result",
    openapi_extra={**JOB_BODY_DOC, **IDEMPOTENCY_DOC},
    description=CALLBACK_DOC,
)
async def create_job(
    request: Request, body: AnalyzeBodyDep, svc: ServicesDep, caller: CallerDep
) -> JSONResponse:
    # With an idempotency key the client used before: the job of that key,
    # in the same 202 answer, and nothing is created.
    key = idempotency_key(request)
    job, _ = await in_store_thread(
        request,
        lambda: svc.analysis.submit(
            body.plugin, body.payload(), caller.id, key=key, callback_url=body.callback_url
        ),
    )
    return JSONResponse(
        {"job": job.public(), "links": {"self": f"/v1/jobs/{job.id}"}},
        status_code=202,
        headers={"Location": f"/v1/jobs/{job.id}"},
    )


@router.get(
    "/v1/jobs",
    response_model=JobList,
    responses=JSON_ERRORS,
    summary="The caller's jobs (the admin's: everyone's), newest first, in bounded pages",
)
async def list_jobs(
    request: Request,
    svc: ServicesDep,
    caller: CallerDep,
    status: JobStatus | None = None,
    plugin: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Response:
    body = await in_store_thread(
        request,
        lambda: _page(
            svc.jobs.list_jobs(caller.scope, status, plugin, limit, offset), limit, offset
        ),
    )
    return Response(body, media_type="application/json")


def _page(page: JobPage, limit: int, offset: int) -> str:
    """The page's JSON body. The stored documents are spliced in as they
    are: parsing and re-serializing results would cost many times its size."""
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
    return '{"jobs":[' + ",".join(page.documents) + "]," + tail[1:]


@router.get("/v1/jobs/{job_id}", response_model=JobModel, responses=JSON_ERRORS)
async def get_job(request: Request, job_id: str, svc: ServicesDep, caller: CallerDep) -> Response:
    document = await in_store_thread(request, svc.jobs.job_document, job_id, caller.scope)
    return Response(document, media_type="application/json")


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobModel,
    responses=responses(401, 404, 409, 500),
    summary="Cancel a job: a queued job never runs, a running sandbox is killed",
)
async def cancel_job(
    request: Request, job_id: str, svc: ServicesDep, caller: CallerDep
) -> dict[str, Any]:
    job: Job = await in_store_thread(request, svc.jobs.cancel_job, job_id, caller.scope)
    return job.public()
