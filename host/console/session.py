"""Who is looking at the console, and whether an admin form is genuine.

A browser cannot send the API's bearer header, so the console's login form
puts the token in a cookie instead:

    POST /console/login (token)  -> the token is checked like a bearer token
                                 -> cookie `plughost_console`: HttpOnly (no
                                    script reads it), SameSite=Strict (no other
                                    site's page sends it), Path=/console,
                                    Secure when the request came over HTTPS
    every console request        -> cookie (or a bearer header) -> Principal,
                                    exactly as the API resolves it

Admin forms carry a CSRF token: an HMAC, under a key drawn when the console
is built, of the token in the cookie. A POST whose field does not match
is refused, so a page elsewhere cannot make a logged-in admin's browser
reset a quarantine, even where SameSite is not honoured. With no tokens
configured (the API's open mode) every visitor is `anonymous`, and the
admin actions stay off, as the admin routes do.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request

from host.api.auth import ADMIN, Principal, bearer, matching_token, principal_id
from host.config import Settings
from host.services import ANONYMOUS

COOKIE = "plughost_console"
COOKIE_PATH = "/console"
MAX_TOKEN_CHARS = 4096


@dataclass(frozen=True)
class Visitor:
    """A console visitor: the principal and the token it came with (None: none)."""

    principal: Principal | None
    token: str | None

    @property
    def signed_in(self) -> bool:
        return self.token is not None

    @property
    def admin(self) -> bool:
        return self.principal is not None and self.principal.admin


class ConsoleAuth:
    """Resolves visitors from the cookie and signs and checks CSRF tokens."""

    def __init__(self, settings: Settings, key: bytes | None = None) -> None:
        self.settings = settings
        self._key = key or secrets.token_bytes(32)

    @property
    def open_mode(self) -> bool:
        """No client tokens: every caller is anonymous, as in the API."""
        return not self.settings.client_tokens

    def principal_for(self, token: str | None) -> Principal | None:
        """The principal `token` stands for; None for no token or a wrong one.
        In open mode a missing or unknown token is `anonymous`."""
        if token is not None and len(token) > MAX_TOKEN_CHARS:
            token = None
        admin = self.settings.admin_token
        if token is not None and admin and matching_token(token, [admin]):
            return Principal(ADMIN, admin=True)
        if self.open_mode:
            return Principal(ANONYMOUS)
        found = matching_token(token, self.settings.client_tokens)
        return None if found is None else Principal(principal_id(found))

    def visitor(self, request: Request) -> Visitor:
        """Who sent `request`: the cookie's token, else a bearer header's."""
        token = request.cookies.get(COOKIE) or bearer(request)
        return Visitor(self.principal_for(token), token if self.known(token) else None)

    def known(self, token: str | None) -> bool:
        """True when `token` is a configured admin or client token."""
        if token is None or len(token) > MAX_TOKEN_CHARS:
            return False
        admin = self.settings.admin_token
        if admin and matching_token(token, [admin]):
            return True
        return matching_token(token, self.settings.client_tokens) is not None

    def csrf(self, visitor: Visitor) -> str:
        """The CSRF token for the forms `visitor` is shown."""
        subject = (visitor.token or "").encode()
        return hmac.new(self._key, b"csrf\0" + subject, hashlib.sha256).hexdigest()

    def csrf_ok(self, visitor: Visitor, presented: str | None) -> bool:
        """True when `presented` is `visitor`'s CSRF token (constant time)."""
        if not presented:
            return False
        return hmac.compare_digest(presented.encode(), self.csrf(visitor).encode())
