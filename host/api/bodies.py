"""Analysis request bodies: read into one buffer, parsed by
`host.services.payloads` into a bounded payload.

    request body ──> one buffer (preallocated from Content-Length)
      └─ parse_analyze: caps checked on the raw bytes, image decoded from the buffer

The buffer lives only as long as the dependency that reads it: a route gets
the decoded image, never the text, and nothing of the body is expanded
before its caps are checked. A body that breaks a cap is a 400
`invalid_input` whose message names the cap.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from host.config import Settings
from host.errors import Rejected, envelope
from host.services.callbacks import DELIVERY_HEADER, EVENT, EVENT_HEADER, SIGNATURE_HEADER
from host.services.destinations import MAX_URL_CHARS
from host.services.idempotency import HEADER, MAX_KEY_CHARS, checked_key
from host.services.payloads import (
    ALLOWED_MIME_TYPES,
    AnalyzeBody,
    JsonBounds,
    option_bounds,
    parse_analyze,
    parse_options,
)

# A 1x1 red PNG: the documented example, which a bundled plugin analyzes.
EXAMPLE_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR42mP4z8AAAAMBAQD3A0FDAAAAAElFTkSuQmCC"
)
EXAMPLE_BODY: dict[str, Any] = {
    "plugin": "image_info",
    "image": EXAMPLE_PNG,
    "mime_type": "image/png",
    "options": {},
}


# Documentation only: `analyze_body` parses the body itself, from its raw
# bytes, under the configured caps (the docstring below is what clients read).
class AnalyzeRequest(BaseModel):
    """An image to analyze and the plugin to analyze it with. `options` is
    held to the host's caps on depth, number of items and string length."""

    model_config = ConfigDict(extra="forbid")

    plugin: str | None = Field(
        default=None,
        description="the plugin to run; default: the host's default plugin",
        examples=[EXAMPLE_BODY["plugin"]],
    )
    image: str = Field(
        description="the image file's bytes in standard base64 (RFC 4648, with '=' padding)",
        examples=[EXAMPLE_PNG],
    )
    mime_type: str = Field(
        description="the image's type; it must match the image's bytes: "
        + ", ".join(sorted(ALLOWED_MIME_TYPES)),
        examples=[EXAMPLE_BODY["mime_type"]],
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="the plugin's options (see GET /v1/plugins/{name})",
        examples=[EXAMPLE_BODY["options"]],
    )


class JobRequest(AnalyzeRequest):
    """An analysis to queue as a job; with `callback_url`, the job's public
    view is POSTed there, signed, when it ends."""

    callback_url: str | None = Field(
        default=None,
        max_length=MAX_URL_CHARS,
        description="an absolute http(s) URL (no user name, no fragment) the host POSTs the "
        "job's public view to when it ends; it must be a destination the host's operator "
        "allows (addresses that are not public only when the operator allows their "
        "network too), else the request is a 400 invalid_input saying why; "
        "for example https://hooks.example.com/plughost",
        # null in the example body: it then runs on a host that allows no callbacks.
        examples=[None],
    )


# The request body as OpenAPI shows it, for routes that read their body themselves.
ANALYZE_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": AnalyzeRequest.model_json_schema(),
                "examples": {
                    "image_info": {
                        "summary": "a 1x1 PNG analyzed by image_info",
                        "value": EXAMPLE_BODY,
                    }
                },
            }
        },
    }
}


JOB_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": JobRequest.model_json_schema(),
                "examples": {
                    "image_info": {
                        "summary": "a 1x1 PNG analyzed by image_info",
                        "value": EXAMPLE_BODY,
                    },
                },
            }
        },
    }
}

CALLBACK_DOC = f"""Queue an analysis as a job; poll GET /v1/jobs/{{id}} for its result,
or give a `callback_url`.

**Completion callback.** When a job with a `callback_url` ends (SUCCESS,
FAILED, CANCELLED or INTERRUPTED), the host POSTs its public view, the JSON
GET /v1/jobs/{{id}} returns, to that URL (Content-Type: application/json),
with these headers:

- {EVENT_HEADER}: {EVENT}
- {DELIVERY_HEADER}: the delivery's id, the same on every retry of it (not signed:
  deduplicate on the body's `id`, a job has one callback)
- {SIGNATURE_HEADER}: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">, keyed with
  the UTF-8 bytes of the client's own secret from GET /v1/callbacks/secret

Any 2xx answer is a delivery; anything else (a redirect included, which is never
followed; no answer within the host's timeout) is retried with exponential backoff,
up to the host's attempt limit. Delivery is at least once. The job's view shows
`callback` with its `state` (PENDING, DELIVERING, DELIVERED, FAILED) and each
attempt's time, status and error. The destination is checked again before each
attempt: one that now resolves to an address the host refuses fails at once,
its reason recorded.
"""


# The `Idempotency-Key` header of the routes that create a job.
IDEMPOTENCY_DOC: dict[str, Any] = {
    "parameters": [
        {
            "name": HEADER,
            "in": "header",
            "required": False,
            "description": "A key of the client's choosing (1-255 printable ASCII characters) "
            "that makes a retry safe: the same key from the same client, while its job is "
            "kept (the job retention window), answers with that job (same id, its current "
            "status) and creates nothing; the same key with a different request (plugin, "
            "image, mime_type, options or callback_url) is a 409 `idempotency_key_reused`. "
            "Keys are per client; a key is free again once its job is pruned.",
            "schema": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_KEY_CHARS,
                "pattern": "^[ -~]+$",
            },
            "example": "3f1c9a2e-order-1234",
        }
    ]
}


def idempotency_key(request: Request) -> str | None:
    """The request's `Idempotency-Key`, checked (raises Rejected), or None."""
    return checked_key(request.headers.get(HEADER))


def parse_form_options(text: str, settings: Settings) -> Any:
    """A multipart `options` field, parsed under the same caps as a JSON body's."""
    return parse_options(text, _bounds(settings))


def _bounds(settings: Settings) -> JsonBounds:
    return option_bounds(
        settings.options_max_depth, settings.options_max_items, settings.options_max_string_bytes
    )


def _invalid(message: str) -> Rejected:
    return Rejected(envelope("invalid_input", message))


async def read_body(request: Request) -> bytearray:
    """The whole request body in one buffer, filled in place when the client
    declared its length (the size limit is enforced before, by BodySizeLimit)."""
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():
        buffer = bytearray()
        async for chunk in request.stream():
            buffer += chunk
        return buffer
    buffer = bytearray(int(declared))
    filled = 0
    with memoryview(buffer) as view:
        async for chunk in request.stream():
            if filled + len(chunk) > len(buffer):
                raise _invalid("request body is longer than its Content-Length")
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
    if filled != len(buffer):
        raise _invalid("request body is shorter than its Content-Length")
    return buffer


def require_json(request: Request) -> None:
    """Refuse a body declared as anything but JSON, saying what to send
    (a body with no Content-Type is read as JSON)."""
    declared = request.headers.get("content-type")
    if declared is None:
        return
    media = declared.partition(";")[0].strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return
    upload = "; to send the file itself, POST it as multipart/form-data to /v1/analyze/upload"
    raise _invalid(
        f"request body is sent as {media[:80] or 'an empty Content-Type'}, "
        f"but this route reads JSON: send Content-Type: application/json "
        f'with a JSON object such as {{"image": "<base64>", "mime_type": "image/png"}}'
        + (upload if request.url.path == "/v1/analyze" else "")
    )


async def analyze_body(request: Request) -> AnalyzeBody:
    """FastAPI dependency: the request's body as an AnalyzeBody.

    The body buffer lives only as long as this call: the route gets the
    decoded image, never the text."""
    require_json(request)
    settings: Settings = request.app.state.settings
    buffer = await read_body(request)
    return parse_analyze(buffer, _bounds(settings))


AnalyzeBodyDep = Annotated[AnalyzeBody, Depends(analyze_body)]

__all__ = [
    "ANALYZE_BODY_DOC",
    "CALLBACK_DOC",
    "JOB_BODY_DOC",
    "JobRequest",
    "IDEMPOTENCY_DOC",
    "EXAMPLE_BODY",
    "EXAMPLE_PNG",
    "AnalyzeBodyDep",
    "AnalyzeRequest",
    "analyze_body",
    "idempotency_key",
    "parse_form_options",
    "read_body",
]
