"""Who is calling: bearer tokens become principals.

    no client tokens set     -> every caller is "anonymous"
    a client token           -> "client-<16 hex of its sha256>" (the token itself is never stored),
                                with the name of a `name=token` entry for display
    the admin token          -> "admin", which sees every principal's jobs
    anything else, when client tokens are set -> 401 unauthorized

Admin routes answer 403 `forbidden` unless an admin token is set, and 401
without it. Tokens are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

from host.config import Settings
from host.errors import ServiceError, envelope
from host.logs import CALLER
from host.services import ANONYMOUS

ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """A caller. `scope` is the owner whose jobs it may see (None: every owner).
    `name` is its token's configured name, for display only: jobs and
    figures belong to `id`."""

    id: str
    admin: bool = False
    name: str | None = None

    @property
    def scope(self) -> str | None:
        return None if self.admin else self.id

    @property
    def shown(self) -> str:
        """How logs and the console name the caller: its name, else its id."""
        return self.name or self.id


def principal_id(token: str) -> str:
    """A stable id for a client token, safe to store and log."""
    digest = hashlib.sha256(b"plughost principal\0" + token.encode()).hexdigest()
    return f"client-{digest[:16]}"


def client(token: str, settings: Settings) -> Principal:
    """The principal of a configured client token, with its name if it has one."""
    return Principal(principal_id(token), name=settings.client_names.get(token))


def owner_names(settings: Settings) -> dict[str, str]:
    """The configured name of each named client, by owner id (a principal
    id): the admin's view of whose jobs and calls it sees."""
    return {principal_id(token): name for token, name in settings.client_names.items()}


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, allowed: list[str]) -> str | None:
    """The allowed token equal to `token`, compared in constant time, or None.
    Digests are compared, not the tokens, so the time taken tells nothing of a
    token's length either; every candidate is compared, even after a match."""
    if token is None:
        return None
    presented = hashlib.sha256(token.encode()).digest()
    found = None
    for candidate in allowed:
        if hmac.compare_digest(presented, hashlib.sha256(candidate.encode()).digest()):
            found = candidate
    return found


def identify_client(request: Request, settings: Settings) -> Principal:
    """The caller of a client route. Raises 401 (ServiceError)."""
    token = bearer(request)
    if settings.admin_token and _matches(token, [settings.admin_token]):
        return noted(Principal(ADMIN, admin=True))
    if not settings.client_tokens:
        return noted(Principal(ANONYMOUS))
    found = _matches(token, settings.client_tokens)
    if found is None:
        raise ServiceError(envelope("unauthorized", "a valid bearer token is required"))
    return noted(client(found, settings))


def noted(principal: Principal) -> Principal:
    """`principal`, named as the caller of this request's log lines
    (uvicorn's access line included)."""
    CALLER.set(principal.shown)
    return principal


def identify_admin(request: Request, settings: Settings) -> Principal:
    """The caller of an admin route: 403 while no admin token is set, 401 without it."""
    if not settings.admin_token:
        raise ServiceError(envelope("forbidden", "admin routes are off: no admin token set"))
    if not _matches(bearer(request), [settings.admin_token]):
        raise ServiceError(envelope("unauthorized", "the admin token is required"))
    return noted(Principal(ADMIN, admin=True))


def matching_token(token: str | None, allowed: list[str]) -> str | None:
    """The allowed token equal to `token` (constant-time), or None: the API's
    comparison, for the console, which reads its token from the sign-in form."""
    return _matches(token, allowed)
