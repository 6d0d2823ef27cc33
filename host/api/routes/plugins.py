"""Plugins: `GET /v1/plugins` and `GET /v1/plugins/{name}` (manifest, limits,
state, metrics, quarantine)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from host.api.deps import CLIENT, JSON_ERRORS, ServicesDep

router = APIRouter(tags=["plugins"])


@router.get("/v1/plugins", responses=JSON_ERRORS, dependencies=CLIENT)
def list_plugins(svc: ServicesDep) -> dict[str, Any]:
    return {
        "plugins": svc.plugins.list_plugins(),
        "load_errors": svc.plugins.registry.load_errors,
    }


@router.get("/v1/plugins/{name}", responses=JSON_ERRORS, dependencies=CLIENT)
def get_plugin(name: str, svc: ServicesDep) -> dict[str, Any]:
    return svc.plugins.describe(name)
