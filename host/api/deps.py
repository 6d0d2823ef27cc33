"""The dependencies every router shares, in one place.

    ServicesDep   the app's Services (built by the lifespan, or given to create_app)
    SettingsDep   the app's Settings
    CallerDep     the Principal of a client route (401 without a valid token)
    CLIENT        route dependencies of a client route
    ADMIN         route dependencies of an admin route (403 while no admin token, 401 without it)
    JSON_ERRORS   the error statuses most routes document

FastAPI calls a dependency once per request however many parameters ask for
it, so a route that names CallerDep and lists CLIENT checks its token once.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from host.api.auth import Principal, identify_admin, identify_client
from host.api.errors import responses
from host.config import Settings
from host.services.build import Services


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
    "CallerDep",
    "ServicesDep",
    "SettingsDep",
    "get_services",
    "get_settings",
    "require_admin",
    "require_client",
]
