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
from host.services.payloads import (
    AnalyzeBody,
    JsonBounds,
    option_bounds,
    parse_analyze,
    parse_options,
)


class AnalyzeRequest(BaseModel):
    """The JSON body of /v1/analyze and POST /v1/jobs, as documented.

    `analyze_body` parses it (this model only describes it): `options` is
    held to the configured depth, item and string caps.
    """

    model_config = ConfigDict(extra="forbid")

    plugin: str | None = Field(default=None, description="default: the configured plugin")
    image: str = Field(description="the image, base64-encoded")
    mime_type: str = Field(examples=["image/png"])
    options: dict[str, Any] = Field(default_factory=dict)


# The request body as OpenAPI shows it, for routes that read their body themselves.
ANALYZE_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": AnalyzeRequest.model_json_schema()}},
    }
}


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


async def analyze_body(request: Request) -> AnalyzeBody:
    """FastAPI dependency: the request's body as an AnalyzeBody.

    The body buffer lives only as long as this call: the route gets the
    decoded image, never the text."""
    settings: Settings = request.app.state.settings
    buffer = await read_body(request)
    return parse_analyze(buffer, _bounds(settings))


AnalyzeBodyDep = Annotated[AnalyzeBody, Depends(analyze_body)]

__all__ = [
    "ANALYZE_BODY_DOC",
    "AnalyzeBodyDep",
    "AnalyzeRequest",
    "analyze_body",
    "parse_form_options",
    "read_body",
]
