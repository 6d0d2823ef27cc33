"""The dependencies every router shares, in one place.

    ServicesDep   the app's Services (built by the lifespan, or given to create_app)
    SettingsDep   the app's Settings
    CallerDep     the Principal of a client route (401 without a valid token)
    CLIENT        route dependencies of a client route
    ADMIN         route dependencies of an admin route (403 while no admin token, 401 without it)
    JSON_ERRORS   the error statuses most routes document
    MAX_OFFSET    the largest `offset` query parameter of a paged listing
    in_store_thread(request, call, ...)  `call` on one of the store's threads

FastAPI calls a dependency once per request however many parameters ask for
it, so a route that names CallerDep and lists CLIENT checks its token once.

Work that reads or writes the job store (or, in cluster mode, waits on
PostgreSQL) runs on threads of its own, STORE_THREADS at most per app
(`app.state.store_threads`), not in the thread pool every plain `def` route
shares: requests that all wait on a held database fill the store's threads
and queue for them, and the other routes still get a thread.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import Depends, Request

from host.api.auth import Principal, identify_admin, identify_client
from host.api.errors import responses
from host.config import Settings
from host.services.build import Services

T = TypeVar("T")
STORE_THREADS = 40
# The largest `offset` of a paged listing: past any store's rows, and within
# the 64-bit integers SQLite and PostgreSQL take (a larger one is a 400, not a 500).
MAX_OFFSET = 1_000_000_000


async def in_store_thread(request: Request, call: Callable[..., T], *args: Any) -> T:
    """`call(*args)` on one of the app's store threads, awaited from the loop."""
    limiter: anyio.CapacityLimiter = request.app.state.store_threads
    return await anyio.to_thread.run_sync(functools.partial(call, *args), limiter=limiter)


def _settings(request: Request) -> Settings:
    found: Settings = request.app.state.settings
    return found


# Coroutines, though none of them waits on anything: FastAPI would run a
# plain function in its thread pool, a hand-over to another thread and back
# for each dependency of each request.


async def get_services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


async def get_settings(request: Request) -> Settings:
    return _settings(request)


async def require_client(request: Request) -> Principal:
    return identify_client(request, _settings(request))


async def require_admin(request: Request) -> Principal:
    return identify_admin(request, _settings(request))


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CallerDep = Annotated[Principal, Depends(require_client)]
CLIENT: list[Any] = [Depends(require_client)]
ADMIN: list[Any] = [Depends(require_admin)]
JSON_ERRORS = responses(400, 401, 404, 413, 424, 429, 500, 503)

__all__ = [
    "ADMIN",
    "CLIENT",
    "JSON_ERRORS",
    "MAX_OFFSET",
    "STORE_THREADS",
    "CallerDep",
    "ServicesDep",
    "SettingsDep",
    "get_services",
    "get_settings",
    "in_store_thread",
    "require_admin",
    "require_client",
]
