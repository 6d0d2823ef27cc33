"""The operator's console at /console: server-rendered pages over the services.

    GET  /console                      overview: plugins, state, quarantine, figures
    GET  /console/plugins/{name}       manifest, limits, options schema, recent outcomes
    GET  /console/isolation            active and missing layers, start-up self-check
    GET  /console/jobs                 jobs (the visitor's own; the admin's: everyone's)
    GET  /console/jobs/{id}            one job: status, times, result or error (404 for another's)
    GET  /console/login, POST          token -> a server-side session, its id in an
                                       HttpOnly SameSite=Strict cookie (same-origin,
                                       CSRF-checked, throttled per address)
    POST /console/logout               ends the session on the server (CSRF-checked)
    GET  /console/confirm/{action}     the confirmation step of an admin action (no JS needed)
    POST /console/plugins/{name}/quarantine/reset, POST /console/reload   admin, CSRF-checked
    GET  /console/static/{file}        the console's own CSS and JS, from the package

Read-only pages work without JavaScript; the script only counts quarantines
down and refreshes the overview. Every asset comes from the package: no CDN.
Visitors resolve to the API's principals (`host.console.session`), and what
a page shows a client is its own (`host.console.views`): its calls' recent
outcomes, no host paths, installer output or load errors.
"""

from __future__ import annotations

import logging
import math
import secrets
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from host import __version__
from host.api.auth import Principal, noted, owner_names
from host.api.deps import MAX_OFFSET, in_store_thread
from host.config import Settings
from host.console import states, views
from host.console.session import (
    COOKIE,
    COOKIE_PATH,
    LOGIN_COOKIE,
    ConsoleAuth,
    Visitor,
    client_address,
)
from host.errors import JobNotFound, Rejected, ServiceError
from host.services import JobStatus

log = logging.getLogger("plughost.console")
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Same-origin: the console's own form posts keep a real Origin header
    # (under no-referrer a browser sends `Origin: null`), other sites get nothing.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
MAX_JOB_ID = 128  # longer than any job id: a longer path is an unknown job
ACTIONS = {"reset": "Lift the quarantine of plugin {name}", "reload": "Discover plugins again"}
# What a page says after an admin action redirected to it (`?done=...`).
DONE = {"reset": "The quarantine was lifted.", "reload": "Plugins were discovered again."}


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("host.console", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    # An em dash for a figure there is none of: no call yet, or nothing measured.
    env.filters["num"] = lambda v, unit="": "—" if v is None else f"{v:g}{unit}"
    env.globals["QUARANTINED"] = states.QUARANTINED
    env.globals["QUARANTINE_OVER"] = states.QUARANTINE_OVER
    # ISO-8601 UTC timestamps, to the second, for tables (the full value stays in <time>).
    env.filters["when"] = lambda v: "–" if not v else str(v)[:19].replace("T", " ")
    env.filters["short"] = short_time
    return env


def short_time(value: str | None, now: datetime | None = None) -> str:
    """An ISO-8601 UTC timestamp in as few characters as a table needs:
    `07:08:41` today, `12-06 23:59` earlier this year, `2025-12-31` before."""
    if not value:
        return "—"
    try:
        at = datetime.fromisoformat(str(value)).astimezone(UTC)
    except ValueError:
        return str(value)[:19]
    now = now or datetime.now(UTC)
    if at.date() == now.date():
        return at.strftime("%H:%M:%S")
    return at.strftime("%m-%d %H:%M") if at.year == now.year else at.strftime("%Y-%m-%d")


def _static_files() -> dict[str, tuple[bytes, str]]:
    found = {}
    for entry in resources.files("host.console").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if suffix in STATIC_TYPES:
            found[entry.name] = (entry.read_bytes(), STATIC_TYPES[suffix])
    return found


class Pages:
    """Renders templates with what every page needs (visitor, CSRF token, nav)."""

    def __init__(self, auth: ConsoleAuth) -> None:
        self.auth = auth
        self.env = _environment()

    def render(
        self,
        request: Request,
        visitor: Visitor,
        template: str,
        code: int = 200,
        csrf: str | None = None,
        **ctx: Any,
    ) -> HTMLResponse:
        """`template` for `visitor`; `csrf` replaces the visitor's CSRF token
        (the sign-in form's is tied to its pre-session cookie)."""
        body = self.env.get_template(template).render(
            visitor=visitor,
            open_mode=self.auth.open_mode,
            admin_enabled=bool(self.auth.settings.admin_token),
            csrf=self.auth.csrf(visitor) if csrf is None else csrf,
            path=request.url.path,
            done=DONE.get(request.query_params.get("done", "")),
            version=__version__,
            **ctx,
        )
        return HTMLResponse(body, status_code=code, headers=SECURITY_HEADERS)


def console_router(settings: Settings) -> APIRouter:
    """The console's routes, for `app.include_router`."""
    auth = ConsoleAuth(settings)
    pages = Pages(auth)

    async def note_visitor(request: Request) -> None:
        # On the request's own task (the pages run on threads), so that its
        # log lines, uvicorn's access line included, name the visitor.
        principal = auth.visitor(request).principal
        if principal is not None:
            noted(principal)

    router = APIRouter(
        prefix="/console", include_in_schema=False, dependencies=[Depends(note_visitor)]
    )
    _read_routes(router, settings, auth, pages)
    _job_routes(router, settings, auth, pages)
    _batch_routes(router, settings, auth, pages)
    _account_routes(router, auth, pages)
    _admin_routes(router, settings, auth, pages)
    static = _static_files()

    @router.get("/static/{file}")
    def asset(file: str) -> Response:
        if file not in static:
            return Response("not found", status_code=404, media_type="text/plain")
        body, media_type = static[file]
        return Response(body, media_type=media_type, headers={"Cache-Control": "max-age=300"})

    return router


def _reader(auth: ConsoleAuth, request: Request) -> tuple[Visitor, Principal] | Response:
    """The visitor and its principal, or a redirect to the login page for a
    visitor the API would refuse (client tokens set, none or a wrong one sent)."""
    visitor = auth.visitor(request)
    if visitor.principal is None:
        return RedirectResponse("/console/login", status_code=303)
    return visitor, visitor.principal


def _read_routes(router: APIRouter, settings: Settings, auth: ConsoleAuth, pages: Pages) -> None:
    def self_check(request: Request) -> dict[str, Any] | None:
        found: dict[str, Any] | None = request.app.state.self_check
        return found

    @router.get("", response_class=HTMLResponse)
    def overview(request: Request) -> Response:
        if isinstance(found := _reader(auth, request), Response):
            return found
        visitor, principal = found
        data = views.overview(
            request.app.state.services, self_check(request), visitor.admin, principal.scope
        )
        return pages.render(request, visitor, "overview.html", **data)

    @router.get("/plugins/{name}", response_class=HTMLResponse)
    def plugin(request: Request, name: str) -> Response:
        if isinstance(found := _reader(auth, request), Response):
            return found
        visitor, principal = found
        try:
            data = views.plugin_page(
                request.app.state.services.plugins,
                name,
                principal.scope,
                principal.admin,
                owner_names(settings),
            )
        except (Rejected, KeyError):
            return pages.render(request, found[0], "missing.html", 404, what=f"plugin {name}")
        return pages.render(request, found[0], "plugin.html", p=data)

    @router.get("/isolation", response_class=HTMLResponse)
    def isolation(request: Request) -> Response:
        if isinstance(found := _reader(auth, request), Response):
            return found
        services, disabled = request.app.state.services, list(settings.disable_layers)
        data = views.isolation(
            services, settings.isolation, disabled, self_check(request), found[0].admin
        )
        return pages.render(request, found[0], "isolation.html", **data)


def _job_routes(router: APIRouter, settings: Settings, auth: ConsoleAuth, pages: Pages) -> None:
    # The job pages read the store: on the store's threads (in_store_thread).
    @router.get("/jobs", response_class=HTMLResponse)
    async def jobs(
        request: Request,
        status: Annotated[str, Query(max_length=16)] = "",
        plugin: Annotated[str, Query(max_length=64)] = "",
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> Response:
        return await in_store_thread(request, jobs_page, request, status, plugin, offset)

    def jobs_page(request: Request, status: str, plugin: str, offset: int) -> Response:
        if isinstance(found := _reader(auth, request), Response):
            return found
        visitor, principal = found
        services = request.app.state.services
        chosen = JobStatus(status) if status in JobStatus.__members__ else None
        names = owner_names(settings)
        data = views.jobs_page(
            services.jobs, principal.scope, chosen, plugin or None, offset, names
        )
        return pages.render(
            request,
            visitor,
            "jobs.html",
            status=chosen.value if chosen else "",
            plugin=plugin,
            plugin_names=services.plugins.registry.list_plugins(),
            **data,
        )

    @router.get("/jobs/{job_id}", response_class=HTMLResponse)
    async def job(request: Request, job_id: str) -> Response:
        return await in_store_thread(request, job_page, request, job_id)

    def job_page(request: Request, job_id: str) -> Response:
        if isinstance(found := _reader(auth, request), Response):
            return found
        visitor, principal = found
        jobs = request.app.state.services.jobs
        try:
            data = views.job_page(jobs, job_id[:MAX_JOB_ID], principal.scope, owner_names(settings))
        except JobNotFound:  # another client's job as an unknown one
            shown = job_id[:MAX_JOB_ID]
            return pages.render(request, visitor, "missing.html", 404, what=f"job {shown}")
        return pages.render(request, visitor, "job.html", job=data)


def _batch_routes(router: APIRouter, settings: Settings, auth: ConsoleAuth, pages: Pages) -> None:
    # As the job pages: the store is read on the store's threads.
    @router.get("/batches", response_class=HTMLResponse)
    async def batches(
        request: Request, offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0
    ) -> Response:
        return await in_store_thread(request, batches_page, request, offset)

    def batches_page(request: Request, offset: int) -> Response:
        if isinstance(found := _reader(auth, request), Response):
            return found
        visitor, principal = found
        service = request.app.state.services.batches
        data = views.batches_page(service, principal.scope, offset, owner_names(settings))
        return pages.render(request, visitor, "batches.html", **data)

    @router.get("/batches/{batch_id}", response_class=HTMLResponse)
    async def batch(
        request: Request, batch_id: str, offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0
    ) -> Response:
        return await in_store_thread(request, batch_page, request, batch_id, offset)

    def batch_page(request: Request, batch_id: str, offset: int) -> Response:
        if isinstance(found := _reader(auth, request), Response):
            return found
        visitor, principal = found
        service = request.app.state.services.batches
        shown = batch_id[:MAX_JOB_ID]
        try:
            data = views.batch_page(
                service, shown, principal.scope, offset, settings.max_list_bytes,
                owner_names(settings),
            )  # fmt: skip
        except ServiceError as exc:  # another client's batch as an unknown one
            if exc.reason != "not_found":
                raise
            return pages.render(request, visitor, "missing.html", 404, what=f"batch {shown}")
        return pages.render(request, visitor, "batch.html", batch=data)


def _account_routes(router: APIRouter, auth: ConsoleAuth, pages: Pages) -> None:
    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        return _login_page(request, auth, pages, 200, failed=False)

    @router.post("/login", response_class=HTMLResponse)
    def login(
        request: Request,
        token: Annotated[str, Form(max_length=4096)] = "",
        csrf: Annotated[str, Form(max_length=128)] = "",
    ) -> Response:
        return _sign_in(request, token, csrf, auth, pages)

    @router.post("/logout")
    def logout(request: Request, csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
        if not auth.csrf_ok(auth.visitor(request), csrf):
            return Response("bad or missing CSRF token", status_code=403, media_type="text/plain")
        auth.sign_out(request)
        response = RedirectResponse("/console/login", status_code=303)
        response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
        return response


def _sign_in(request: Request, token: str, csrf: str, auth: ConsoleAuth, pages: Pages) -> Response:
    """The sign-in form's post: refused cross-site or without the form's
    CSRF field (403), while the address is throttled (429), for a token
    that is not configured (401); else a new session and its cookie."""
    address = client_address(request)
    if not auth.same_origin(request) or not auth.login_csrf_ok(request, csrf):
        log.warning("console sign-in refused: cross-site or no CSRF token from %s", address)
        return pages.render(
            request,
            auth.visitor(request),
            "forbidden.html",
            403,
            reason="the sign-in form was not this console's",
        )
    retry = auth.throttle.retry_after(address)
    if retry is not None:
        log.warning("console sign-in throttled for %s", address)
        return _login_page(
            request,
            auth,
            pages,
            429,
            failed=False,
            throttled=True,
            headers={"Retry-After": str(max(1, math.ceil(retry)))},
        )
    session_id = auth.sign_in(token.strip())
    if session_id is None:
        failures = auth.throttle.failed(address)
        log.warning(
            "console sign-in refused: unknown token (%d in this window from %s)",
            failures,
            address,
        )
        return _login_page(request, auth, pages, 401, failed=True)
    response = RedirectResponse("/console", status_code=303)
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=int(auth.settings.console_session_s),
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=auth.secure_cookie(request),
    )
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return response


def _login_page(
    request: Request,
    auth: ConsoleAuth,
    pages: Pages,
    code: int,
    headers: dict[str, str] | None = None,
    **ctx: Any,
) -> Response:
    """The sign-in form, with a CSRF field tied to the visitor's pre-session
    cookie (set here when the browser has none yet)."""
    pre_session = request.cookies.get(LOGIN_COOKIE) or ""
    fresh = not pre_session or len(pre_session) > 128
    if fresh:
        pre_session = secrets.token_urlsafe(32)
    visitor = auth.visitor(request)
    response = pages.render(
        request, visitor, "login.html", code, csrf=auth.login_csrf(pre_session), **ctx
    )
    response.headers.update(headers or {})
    if fresh:
        response.set_cookie(
            LOGIN_COOKIE,
            pre_session,
            path=COOKIE_PATH,
            httponly=True,
            samesite="strict",
            secure=auth.secure_cookie(request),
        )
    return response


def _refused(request: Request, visitor: Visitor, settings: Settings, pages: Pages) -> Response:
    reason = (
        "admin actions are off: no admin token is set"
        if not settings.admin_token
        else "sign in with the admin token to do this"
    )
    return pages.render(request, visitor, "forbidden.html", 403, reason=reason)


def _admin_post(
    request: Request, csrf: str, settings: Settings, auth: ConsoleAuth, pages: Pages
) -> Visitor | Response:
    """The admin visitor of a genuine form post, or the page refusing it."""
    visitor = auth.visitor(request)
    if not visitor.admin or not settings.admin_token:
        return _refused(request, visitor, settings, pages)
    if not auth.same_origin(request) or not auth.csrf_ok(visitor, csrf):
        log.warning("console admin action refused: cross-site or bad CSRF token")
        return pages.render(
            request, visitor, "forbidden.html", 403, reason="the form was not genuine"
        )
    return visitor


def _admin_routes(router: APIRouter, settings: Settings, auth: ConsoleAuth, pages: Pages) -> None:
    @router.get("/confirm/{action}", response_class=HTMLResponse)
    def confirm(
        request: Request, action: str, name: Annotated[str, Query(max_length=64)] = ""
    ) -> Response:
        visitor = auth.visitor(request)
        if not visitor.admin or not settings.admin_token:
            return _refused(request, visitor, settings, pages)
        if action not in ACTIONS:
            return pages.render(request, visitor, "missing.html", 404, what=f"action {action}")
        known = request.app.state.services.plugins.registry.list_plugins()
        if action == "reset" and name not in known:
            return pages.render(request, visitor, "missing.html", 404, what=f"plugin {name}")
        target = (
            f"/console/plugins/{name}/quarantine/reset" if action == "reset" else "/console/reload"
        )
        question = ACTIONS[action].format(name=name)
        back = f"/console/plugins/{name}" if action == "reset" else "/console"
        return pages.render(
            request, visitor, "confirm.html", question=question, target=target, back=back
        )

    @router.post("/plugins/{name}/quarantine/reset")
    def reset(
        request: Request, name: str, csrf: Annotated[str, Form(max_length=128)] = ""
    ) -> Response:
        checked = _admin_post(request, csrf, settings, auth, pages)
        if isinstance(checked, Response):
            return checked
        try:
            request.app.state.services.plugins.reset_quarantine(name)
        except Rejected:
            return pages.render(request, checked, "missing.html", 404, what=f"plugin {name}")
        log.info("quarantine lifted from the console", extra={"plugin": name})
        return RedirectResponse(f"/console/plugins/{name}?done=reset", status_code=303)

    @router.post("/reload")
    def reload(request: Request, csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
        checked = _admin_post(request, csrf, settings, auth, pages)
        if isinstance(checked, Response):
            return checked
        request.app.state.services.plugins.reload(settings.plugins_dirs, settings.plugin_overrides)
        log.info("plugins reloaded from the console")
        return RedirectResponse("/console?done=reload", status_code=303)


__all__ = ["console_router"]
