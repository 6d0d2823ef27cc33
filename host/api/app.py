"""The FastAPI application: HTTP in front of AnalysisService and friends.

    create_app(settings, services)
      ├── lifespan: build the services (unless given), log the isolation
      │   layers, run the containment self-check on the serving sandbox,
      │   give up root (--user); on the way out stop jobs and the sandbox
      ├── exception handlers (host/api/errors.py) and the body size limit
      ├── the routers of host/api/routes/ (ROUTERS), dependencies in host/api/deps.py
      └── the operator's console at /console (host/api/console.py)

Nothing runs sandbox, store or database work on the event loop, on a
single node (SQLite) or an API node (PostgreSQL): the routes that touch the
job store (analyze, jobs, the console's job pages) hand that work to the
store's own threads (`in_store_thread`, at most STORE_THREADS, created here
as `app.state.store_threads`), so requests held by the database never take
the thread pool FastAPI runs the plain `def` routes in (plugins, /readyz,
/metrics, the rest of the console); analyses are awaited through
`asyncio.wrap_future`; dependencies and middleware read only the request and
memory; the lifespan's set-up and shutdown run in threads.
tests/host/api/test_event_loop.py (a held SQLite store, a locked SQLite file) and
tests/cluster/test_event_loop.py (PostgreSQL's jobs table locked) show
/healthz and other clients answered meanwhile.
"""

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline

from host import __version__
from host.api.console import console_router
from host.api.deps import STORE_THREADS, require_admin, require_client
from host.api.errors import install_handlers
from host.api.middleware import BodySizeLimit
from host.api.routes import ROUTERS
from host.config import Settings
from host.crashsuite import SuiteReport, self_check
from host.privileges import drop_to
from host.services.build import Services, build_services

log = logging.getLogger("plughost.api")


def _log_protections(settings: Settings, protections: dict[str, bool]) -> None:
    log.info(
        "plughost %s: isolation %s; layers active: %s; missing or off: %s",
        __version__,
        settings.isolation,
        ", ".join(name for name, on in protections.items() if on),
        ", ".join(name for name, on in protections.items() if not on) or "none",
    )


def containment_check(services: Services) -> dict[str, Any]:
    """Run the self-check probes on the sandbox the server serves with; its report."""
    report = self_check(services.plugins.sandbox)
    return {
        "ok": report.ok,
        "headline": _headline(report),
        "public_headline": _headline(report, evidence=False),
        **report.summary(),
        "missing_layers": report.missing_layers,
        "failed_cases": {c.name: c.problems for c in report.failed},
        "benign_failures": report.benign_failures,
        "case_verdicts": [
            {"name": c.name, "category": c.category, "verdict": c.verdict} for c in report.cases
        ],
    }


def _headline(report: SuiteReport, evidence: bool = True) -> str:
    """The self-check's result in one plain line: with `evidence` (the log,
    the admin), what the first failed probe and benign call saw, which can
    name host files; without it (anyone, at /readyz), which probes failed."""
    summary = report.summary()
    line = f"{summary['passed']} of {summary['cases']} probes passed"
    if report.failed and evidence:
        first = report.failed[0]
        line += f"; {first.name}: {'; '.join(first.problems)[:300]}"
    elif report.failed:
        line += f"; failed: {', '.join(case.name for case in report.failed)}"
    if report.benign_failures:
        line += f"; {len(report.benign_failures)} of {report.benign_calls} benign calls failed"
        if evidence:
            line += f" ({report.benign_failures[0][:300]})"
    return line


async def _check_containment(app: FastAPI, settings: Settings) -> None:
    """The start-up self-check; raises RuntimeError when it fails and
    `require_containment` is set."""
    check = await asyncio.to_thread(containment_check, app.state.services)
    app.state.self_check = check
    if check["ok"]:
        log.info("containment self-check passed: %d probes", check["cases"])
        return
    log.error(
        "plughost cannot contain plugins here: the containment self-check failed (%s); "
        "/readyz answers 503 until it passes",
        check["headline"],
    )
    log.info("containment self-check report: %s", check)
    if settings.require_containment:
        await asyncio.to_thread(app.state.services.jobs.shutdown)
        raise RuntimeError("containment self-check failed; refusing to serve")


def _log_load_errors(services: Services) -> None:
    """A line per plugin directory that was not registered (bad manifest,
    a name taken twice): the operator's log says why it is missing."""
    errors = services.plugins.registry.load_errors
    for problem in errors:
        log.warning("plugin not loaded: %s", problem)
    if errors:
        log.warning(
            "%d plugin director%s not loaded; fix them and reload (POST /v1/admin/reload)",
            len(errors),
            "y" if len(errors) == 1 else "ies",
        )


def _give_up_root(services: Services, settings: Settings) -> None:
    if settings.user is None:
        if os.geteuid() == 0:
            log.warning("the HTTP server runs as root; set user (--user) to serve unprivileged")
        return
    owned = [Path(settings.job_db).parent, Path(settings.plugin_envs)]
    drop_to(settings.user, [*owned, *services.plugins.sandbox_paths()])
    log.info("serving as user %s; calls still start from the root launcher", settings.user)


def _lifespan(settings: Settings, given: Services | None) -> Any:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if given is None:
            app.state.services = await asyncio.to_thread(build_services, settings)
        services: Services = app.state.services
        _log_load_errors(services)
        _log_protections(settings, await asyncio.to_thread(services.plugins.protections))
        if settings.self_check:
            await _check_containment(app, settings)
        _give_up_root(services, settings)
        # Plugin environments are prepared as the serving user, while the API answers.
        services.plugins.preparation.start()
        # The waits of the analyses waiting for their jobs: ended as the
        # server's shutdown nears the end of its graceful period
        # (host/api/server.py), when they answer with their job instead.
        app.state.waits = set()
        yield
        # Nothing is compiled or installed while the server stops.
        await asyncio.to_thread(services.plugins.preparation.stop, 10.0)
        await asyncio.to_thread(services.jobs.shutdown)
        if given is None:  # built here, so stopped here
            await asyncio.to_thread(services.plugins.close)

    return lifespan


BEARER = "bearer"


def _guard(dependant: Dependant) -> str | None:
    """ "admin" or "client" for a route that checks a bearer token, else None."""
    for dependency in dependant.dependencies:
        if dependency.call is require_admin:
            return "admin"
        if dependency.call is require_client:
            return "client"
        found = _guard(dependency)
        if found:
            return found
    return None


def _document(app: FastAPI, settings: Settings) -> None:
    """The OpenAPI schema as clients need it: the bearer token each route
    takes (so /docs has an Authorize button), and no 422 answer, which the
    API never gives (a request it cannot read is a 400 envelope)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schema.setdefault("components", {})["securitySchemes"] = {
            BEARER: {
                "type": "http",
                "scheme": "bearer",
                "description": "A client token; admin routes take the admin token.",
            }
        }
        client_security: list[dict[str, list[str]]] = [{BEARER: []}]
        if not settings.client_tokens:
            client_security.append({})  # every caller is anonymous: the token is optional
        for route in (r for router in ROUTERS for r in router.routes):
            if not isinstance(route, APIRoute) or not route.include_in_schema:
                continue
            guard = _guard(route.dependant)
            for method in route.methods or ():
                operation = schema["paths"].get(route.path_format, {}).get(method.lower())
                if operation is None:
                    continue
                operation.get("responses", {}).pop("422", None)
                if guard is not None:
                    operation["security"] = [{BEARER: []}] if guard == "admin" else client_security
        for unused in ("HTTPValidationError", "ValidationError"):
            schema["components"].get("schemas", {}).pop(unused, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    """The plughost HTTP API. `services` defaults to `build_services(settings)`."""
    settings = settings or Settings()
    # Swagger UI and ReDoc served from the package's own assets: /docs works
    # on a host with no way out to a CDN.
    app = FastAPIOffline(
        title="plughost",
        version=__version__,
        description="Sandboxed host for untrusted image-analysis plugins.",
        lifespan=_lifespan(settings, services),
    )
    app.state.services = services
    app.state.settings = settings
    app.state.self_check = None
    app.state.store_threads = anyio.CapacityLimiter(STORE_THREADS)
    install_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(console_router(settings))
    _document(app, settings)
    return app
