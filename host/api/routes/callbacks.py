"""Callbacks: `GET /v1/callbacks/secret`, the caller's own signing secret
(host/services/callbacks.py), to verify the `Plughost-Signature` of the
callbacks of its jobs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from host.api.deps import CallerDep, ServicesDep, in_store_thread
from host.api.errors import responses
from host.errors import Rejected, envelope
from host.services.callbacks import SIGNATURE_HEADER

router = APIRouter(tags=["callbacks"])


class CallbackSecret(BaseModel):
    secret: str = Field(
        description="the key of the HMAC-SHA256 signatures of this client's callbacks "
        "(its UTF-8 bytes are the key)"
    )
    algorithm: str = "HMAC-SHA256"
    header: str = Field(
        default=SIGNATURE_HEADER,
        description='"t=<unix time>,v1=<hex HMAC of \\"<t>.<body>\\">"',
    )
    owner: str = Field(description="the client the secret belongs to")


@router.get(
    "/v1/callbacks/secret",
    response_model=CallbackSecret,
    responses=responses(400, 401, 500, 503),
    summary="The caller's secret for verifying the signature of its job callbacks",
)
async def callback_secret(request: Request, svc: ServicesDep, caller: CallerDep) -> CallbackSecret:
    callbacks = svc.jobs.callbacks
    if callbacks is None or not callbacks.enabled:
        raise Rejected(envelope("invalid_input", "callbacks are not enabled on this host"))
    secret = await in_store_thread(request, callbacks.secret_for, caller.id)
    return CallbackSecret(secret=secret, owner=caller.id)
