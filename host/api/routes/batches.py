"""Batches: `POST /v1/batches` (202: many images for one plugin, one id),
`GET /v1/batches/{id}` (status, counts per job status, items in bounded
pages), `GET /v1/batches` (the caller's batches), `DELETE /v1/batches/{id}`
(cancel every unfinished item). A client sees and cancels only its own
batches; the admin sees everyone's. Each item is also a job of its own at
`/v1/jobs/{job_id}`.

Every route runs its store work on the store's threads (`in_store_thread`).
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from host.api.bodies import (
    EXAMPLE_PNG,
    IDEMPOTENCY_DOC,
    idempotency_key,
    read_body,
    require_json,
)
from host.api.deps import (
    CLIENT,
    JSON_ERRORS,
    MAX_OFFSET,
    CallerDep,
    ServicesDep,
    SettingsDep,
    in_store_thread,
)
from host.api.errors import responses
from host.api.routes.jobs import CallbackView
from host.services.batches import Batch, parse_batch
from host.services.callbacks import BATCH_EVENT, DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER
from host.services.destinations import MAX_URL_CHARS
from host.services.payloads import option_bounds

router = APIRouter(tags=["batches"])

EXAMPLE_BATCH: dict[str, Any] = {
    "plugin": "image_info",
    "items": [
        {"image": EXAMPLE_PNG, "mime_type": "image/png"},
        {"image": EXAMPLE_PNG, "mime_type": "image/png", "options": {}},
    ],
    "options": {},
}


# Documentation only: the route parses its body itself, under the host's caps.
class BatchItemRequest(BaseModel):
    """One image of a batch: the body of POST /v1/jobs, without a plugin."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(
        description="the image file's bytes in standard base64 (RFC 4648)",
        examples=[EXAMPLE_PNG],
    )
    mime_type: str = Field(
        description="the image's type; it must match the image's bytes", examples=["image/png"]
    )
    options: dict[str, Any] | None = Field(
        default=None,
        description="this item's options; default: the batch's `options`",
        examples=[{}],
    )


class BatchRequest(BaseModel):
    """Images for one plugin, 100 at most unless the host sets another
    limit. Each is checked as POST /v1/jobs checks its body, and one bad
    item refuses the whole batch: a 400 whose details give its `index`."""

    model_config = ConfigDict(extra="forbid")

    plugin: str | None = Field(
        default=None,
        description="the plugin to run; default: the host's default plugin",
        examples=[EXAMPLE_BATCH["plugin"]],
    )
    items: list[BatchItemRequest] = Field(
        min_length=1,
        description="the images, each a job of its own",
        examples=[EXAMPLE_BATCH["items"]],
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="options of the items that give none",
        examples=[EXAMPLE_BATCH["options"]],
    )
    callback_url: str | None = Field(
        default=None,
        max_length=MAX_URL_CHARS,
        description="an absolute http(s) URL (no user name, no fragment) the host POSTs the "
        "batch's view to once, when its last item ends (its items get no callback of their "
        "own); it must be a destination the host's operator allows, checked as POST /v1/jobs "
        "checks its callback_url, else the request is a 400 invalid_input saying why",
        # null in the example body: it then runs on a host that allows no callbacks.
        examples=[None],
    )


class BatchItemRef(BaseModel):
    index: int
    job_id: str


class BatchCreated(BaseModel):
    id: str
    plugin: str
    status: str
    created_at: str
    total: int
    items: list[BatchItemRef]


class BatchItem(BaseModel):
    index: int
    job_id: str
    status: str | None = Field(description="the item's job status; null once it was pruned")
    started_at: str | None = None
    finished_at: str | None = None
    result: dict[str, Any] | None
    error: dict[str, Any] | None


class BatchSummary(BaseModel):
    id: str
    plugin: str
    owner: str
    created_at: str
    finished_at: str | None = Field(description="when its last item ended")
    status: str = Field(description="PENDING (no item started), RUNNING or FINISHED")
    total: int = Field(description="its number of items")
    counts: dict[str, int] = Field(description="its items per job status")


class BatchView(BatchSummary):
    items: list[BatchItem]
    offset: int
    limit: int
    next_offset: int | None = Field(
        description="offset of the next page of items; null on the last"
    )
    truncated: bool = Field(description="the host's size cap for one page ended the items early")
    callback: CallbackView | None = Field(
        default=None,
        description="the batch's completion callback, when it was given a callback_url",
    )


class BatchList(BaseModel):
    batches: list[BatchSummary]
    total: int
    limit: int
    offset: int
    next_offset: int | None


BATCH_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": BatchRequest.model_json_schema(),
                "examples": {
                    "two_pngs": {"summary": "two 1x1 PNGs for image_info", "value": EXAMPLE_BATCH}
                },
            }
        },
    }
}


BATCH_CALLBACK_DOC = f"""Queue many images for one plugin, each a job of its own; poll
GET /v1/batches/{{id}}, or give a `callback_url`.

**Completion callback.** When the batch's last item ends (or the batch is
cancelled), the host POSTs the batch's view, the JSON GET /v1/batches/{{id}}
returns, once, to that URL, signed as a job's callback is (see POST /v1/jobs):

- {EVENT_HEADER}: {BATCH_EVENT}
- {DELIVERY_HEADER}: the delivery's id, the same on every retry of it
- {SIGNATURE_HEADER}: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">

The body holds the batch's status, counts and items with their outcomes, as many
as the host's size cap for one page of items holds: `items_truncated` says whether
some were left out, and `items_next` then gives the path of the next page. The
items get no callback of their own. Retries, the destination policy and the
batch view's `callback` (state, attempts) are as for a job's callback.
"""


def _created(batch: Batch, status: str) -> dict[str, Any]:
    return {
        "id": batch.id,
        "plugin": batch.plugin,
        "status": status,
        "created_at": batch.created_at,
        "total": len(batch.job_ids),
        "items": [{"index": i, "job_id": job_id} for i, job_id in enumerate(batch.job_ids)],
        "links": {"self": f"/v1/batches/{batch.id}"},
    }


@router.post(
    "/v1/batches",
    status_code=202,
    response_model=BatchCreated,
    responses=JSON_ERRORS | responses(409),
    dependencies=CLIENT,
    summary="Queue many images for one plugin; poll GET /v1/batches/{id}",
    description=BATCH_CALLBACK_DOC,
    openapi_extra={**BATCH_BODY_DOC, **IDEMPOTENCY_DOC},
)
async def create_batch(
    request: Request, svc: ServicesDep, settings: SettingsDep, caller: CallerDep
) -> JSONResponse:
    require_json(request)
    key = idempotency_key(request)
    bounds = option_bounds(
        settings.options_max_depth, settings.options_max_items, settings.options_max_string_bytes
    )
    buffer = await read_body(request)
    # Parsing a large body is work for a thread, not for the event loop.
    parsed = await anyio.to_thread.run_sync(
        parse_batch, buffer, bounds, settings.max_batch_items, settings.max_request_bytes
    )
    del buffer
    name = parsed.plugin or settings.default_plugin
    payloads = [item.payload() for item in parsed.items]

    def create() -> tuple[Batch, str]:
        batch = svc.batches.create(
            name, payloads, caller.id, key, settings.max_batch_items, parsed.callback_url
        )
        # A retried request (its key known) gets the batch as it is now.
        now = svc.batches.get(batch.id, caller.id, 1, 0, settings.max_list_bytes)
        return batch, str(now.head()["status"])

    batch, status = await in_store_thread(request, create)
    body = _created(batch, status)
    return JSONResponse(body, status_code=202, headers={"Location": body["links"]["self"]})


@router.get(
    "/v1/batches/{batch_id}",
    response_model=BatchView,
    responses=JSON_ERRORS,
    summary="A batch: status, counts per job status, and its items in bounded pages",
)
async def get_batch(
    request: Request,
    batch_id: str,
    svc: ServicesDep,
    settings: SettingsDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Response:
    view = await in_store_thread(
        request,
        lambda: svc.batches.document(
            batch_id, caller.scope, limit, offset, settings.max_list_bytes
        ),
    )
    return Response(view, media_type="application/json")


@router.get(
    "/v1/batches",
    response_model=BatchList,
    responses=JSON_ERRORS,
    summary="The caller's batches (the admin's: everyone's), newest first",
)
async def list_batches(
    request: Request,
    svc: ServicesDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> dict[str, Any]:
    found, total = await in_store_thread(
        request, svc.batches.list_batches, caller.scope, limit, offset
    )
    end = offset + len(found)
    return {
        "batches": found,
        "total": total,
        "limit": limit,
        "offset": offset,
        "next_offset": end if end < total else None,
    }


@router.delete(
    "/v1/batches/{batch_id}",
    response_model=BatchView,
    responses=responses(401, 404, 409, 500),
    summary="Cancel a batch: its queued items never run, running sandboxes are killed",
)
async def cancel_batch(
    request: Request, batch_id: str, svc: ServicesDep, settings: SettingsDep, caller: CallerDep
) -> Response:
    def cancel() -> str:
        svc.batches.cancel(batch_id, caller.scope)
        return svc.batches.document(batch_id, caller.scope, 100, 0, settings.max_list_bytes)

    view = await in_store_thread(request, cancel)
    return Response(view, media_type="application/json")
