"""The one place where error reasons become HTTP statuses, and the exception
handlers that make every error body `{"detail": <error envelope>}` with no
traceback and no `_internal` in it."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from host.errors import ServiceError, envelope, servable

log = logging.getLogger("plughost.api")

STATUS_BY_REASON = {
    "invalid_input": 400,
    "unknown_plugin": 404,
    "plugin_raised": 400,
    "invalid_output": 400,
    "output_too_large": 400,
    "load_failed": 400,
    "timeout": 400,
    "memory_limit": 400,
    "crashed": 400,
    "protocol_violation": 400,
    "quarantined": 503,
    "environment_not_ready": 503,
    "overloaded": 503,
    "cancelled": 409,
    "internal": 500,
    "interrupted": 500,
    "unknown_job": 404,
    "job_finished": 409,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "unauthorized": 401,
    "forbidden": 403,
    "quota_exceeded": 429,
}


class ErrorModel(BaseModel):
    type: str
    message: str
    details: dict[str, Any]
    plugin: str | None
    timestamp: str


class ErrorBody(BaseModel):
    """Every error response: the public part of the error envelope."""

    detail: ErrorModel


class EnvelopeResponse(JSONResponse):
    """A JSON response that renders whatever an envelope holds.

    An envelope can carry text a client or a plugin chose (a lone surrogate
    does not encode as UTF-8) or a value `json` refuses; such parts are made
    valid instead of turning an error answer into a 500.
    """

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
            return super().render(servable(content))


def error_response(error: dict[str, Any]) -> JSONResponse:
    """Answer with `{"detail": error}` and the status its reason maps to."""
    reason = error.get("details", {}).get("reason", "internal")
    status = STATUS_BY_REASON.get(reason, 500)
    headers = {}
    retry = error.get("details", {}).get("retry_after_s")
    if status == 503 or retry is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry or 1)))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return EnvelopeResponse({"detail": error}, status_code=status, headers=headers)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI description of the error statuses a route can answer."""
    return {
        status: {"model": ErrorBody, "description": f"error envelope ({status})"}
        for status in statuses
    }


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.envelope["error"])


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {
            "field": ".".join(str(p) for p in item.get("loc", ())),
            "problem": str(item.get("msg"))[:200],
        }
        for item in exc.errors()[:20]
    ]
    where = ", ".join(p["field"] for p in problems) or "request"
    return error_response(
        envelope("invalid_input", f"invalid request: {where}", problems=problems)["error"]
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    reason = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
        exc.status_code, "invalid_input"
    )
    response = error_response(envelope(reason, str(exc.detail))["error"])
    response.status_code = exc.status_code
    return response


async def _client_gone(request: Request, exc: Exception) -> JSONResponse:
    # The client left (or was disconnected for missing its body deadline):
    # nobody reads this answer, and it is no error of the host's.
    return error_response(
        envelope("invalid_input", "the client disconnected before its request was complete")[
            "error"
        ]
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(envelope("internal", "internal error in the plugin host")["error"])


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
