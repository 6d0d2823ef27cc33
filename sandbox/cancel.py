"""Cancelling a running call from another thread (host).

`ToolRunner.run(plugin_name, payload)` has a fixed signature, so the token
travels in a context variable: the thread that runs a call sets it with
`use_token`, and the supervisor's wait loop watches the token's descriptor
next to the child's pipes. `CancelToken.cancel()` makes that descriptor
readable, the loop wakes at once, and the call's processes are killed.
"""

from __future__ import annotations

import contextvars
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_current: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar(
    "plughost_cancel_token", default=None
)


class CancelToken:
    """A one-shot cancellation flag with a pollable descriptor."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()
        self._cancelled = False
        self._closed = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def fileno(self) -> int:
        """Descriptor that becomes readable once `cancel()` was called."""
        return self._read

    def cancel(self) -> None:
        """Cancel; idempotent and safe from any thread."""
        with self._lock:
            if self._cancelled or self._closed:
                self._cancelled = True
                return
            self._cancelled = True
            os.write(self._write, b"x")

    def close(self) -> None:
        """Release the descriptors."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read)
                os.close(self._write)


def current_token() -> CancelToken | None:
    """The token of the call running in this context, if any."""
    return _current.get()


@contextmanager
def use_token(token: CancelToken) -> Iterator[CancelToken]:
    """Make `token` the cancel token of calls made inside the block."""
    reset = _current.set(token)
    try:
        yield token
    finally:
        _current.reset(reset)
