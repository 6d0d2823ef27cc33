"""The API's routers, one per resource. `ROUTERS` is the one list
`create_app` includes; a new resource adds its router here."""

from fastapi import APIRouter

from host.api.routes import admin, analyze, batches, callbacks, health, jobs, plugins

ROUTERS: tuple[APIRouter, ...] = (
    analyze.router,
    jobs.router,
    batches.router,
    callbacks.router,
    plugins.router,
    admin.router,
    health.router,
)

__all__ = ["ROUTERS"]
