"""Request size limit, enforced before a huge body is buffered.

A declared Content-Length over the limit is refused at once; a body without
one (chunked) is counted as it streams and refused as soon as it passes the
limit. Either way the answer is 413 with the error envelope every other
error has (`error_response`), naming the limit.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from host.api.errors import error_response
from host.errors import envelope


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit():
                    shown = value[:40].decode("latin-1")
                    error = envelope("invalid_input", f"Content-Length {shown!r} is not a number")
                    await error_response(error["error"])(scope, receive, send)
                    return
                declared = int(value)
                if declared > self.max_bytes:
                    await self._refuse(scope, receive, send, declared)
                    return
        seen = 0
        started = False
        exceeded = False

        async def counting_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                # The app turned our interruption into its own error: answer 413 instead.
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._refuse(scope, receive, send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, declared: int | None = None
    ) -> None:
        """Answer 413: `declared` is the Content-Length the client sent (None:
        the body came without one and passed the limit as it streamed)."""
        details: dict[str, Any] = {"limit_bytes": self.max_bytes}
        if declared is None:
            message = f"request body passed the limit of {self.max_bytes} bytes"
        else:
            message = f"request body of {declared} bytes is over the limit of {self.max_bytes}"
            details["declared_bytes"] = declared
        error = envelope("payload_too_large", message, None, **details)
        await error_response(error["error"])(scope, receive, send)
