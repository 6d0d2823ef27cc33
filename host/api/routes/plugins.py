"""Plugins: `GET /v1/plugins` and `GET /v1/plugins/{name}` (manifest, limits,
state, metrics, quarantine).

What only the admin token is shown: load errors (they name host paths and
quote plugins' files) and an environment's `detail` (the installer's
output). A client gets counts, status, reason codes and fixed messages, and
the figures (`metrics`) of its own calls alone; the admin every call's."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from host.api.deps import JSON_ERRORS, CallerDep, ServicesDep

router = APIRouter(tags=["plugins"])


@router.get("/v1/plugins", responses=JSON_ERRORS)
def list_plugins(svc: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    return {
        "plugins": svc.plugins.list_plugins(caller.admin, caller.scope),
        **svc.plugins.load_errors(caller.admin),
    }


@router.get("/v1/plugins/{name}", responses=JSON_ERRORS)
def get_plugin(name: str, svc: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    return svc.plugins.describe(name, caller.admin, caller.scope)
