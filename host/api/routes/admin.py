"""Admin routes, closed (403) until an admin token is set: lift a plugin's
quarantine, discover plugins again. The router carries the admin check, so
a route added here cannot forget it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from host.api.deps import ADMIN, ServicesDep, SettingsDep
from host.api.errors import responses

router = APIRouter(tags=["admin"], dependencies=ADMIN, responses=responses(401, 403))


@router.post(
    "/v1/admin/plugins/{name}/quarantine/reset",
    responses=responses(404),
    summary="Lift a plugin's quarantine",
)
def reset_quarantine(name: str, svc: ServicesDep) -> dict[str, Any]:
    return svc.plugins.reset_quarantine(name)


@router.post(
    "/v1/admin/reload",
    summary="Discover plugins again",
)
def reload_plugins(svc: ServicesDep, settings: SettingsDep) -> dict[str, Any]:
    names = svc.plugins.reload(settings.plugins_dirs, settings.plugin_overrides)
    return {"plugins": names, "load_errors": svc.plugins.registry.load_errors}
