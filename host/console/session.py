"""Who is looking at the console: server-side sessions, CSRF tokens and the
sign-in throttle.

A browser cannot send the API's bearer header, so the console signs a
visitor in once and remembers the session, never the token:

    GET  /console/login           -> pre-session cookie `plughost_console_login`
                                     (random; HttpOnly, SameSite=Strict, Path=/console);
                                     the form's CSRF field is an HMAC of it
    POST /console/login (token)   -> refused (403) unless Origin, or without it
                                     Referer, is the console's own origin and the
                                     CSRF field matches the pre-session cookie;
                                     refused (429 + Retry-After) while the address
                                     is throttled; the token compared in constant
                                     time with the configured ones
                                  -> a new session: 32 random bytes in cookie
                                     `plughost_console` (HttpOnly, SameSite=Strict,
                                     Path=/console, Secure over HTTPS or when
                                     `console_secure_cookie` says so)
    every console request         -> cookie -> session (unexpired, and the token it
                                     was made from still configured) -> Principal;
                                     or a bearer header -> Principal, as in the API
    POST /console/logout (csrf)   -> the session is deleted on the server

The server keeps, per session, the SHA-256 of its id (not the id), a keyed
digest of the token it was made from (not the token), its CSRF token and
its expiry (`console_session_s` after sign-in). Sessions live in the serving
process's memory: a restart signs everyone out, and so does changing the
tokens (a session whose token is no longer configured is dropped when next
presented).

Forms that change something (sign-out, the admin actions) carry the
session's CSRF token; a POST whose field does not match is refused, so a
page elsewhere cannot make a signed-in browser act, even where SameSite is
not honoured. With no client tokens configured (the API's open mode) every
visitor is `anonymous`, and the admin actions need the admin token.

Wrong tokens are throttled per client address (an IPv6 address by its /64):
a fixed window of `console_login_window_s` opens at an address's first
failure, and once `console_login_failures` tokens have failed in it every
sign-in from that address, right or wrong, is answered 429 with
`Retry-After` until the window closes. Each failure is logged with the
address and the count, never with the token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request

from host.api.auth import ADMIN, Principal, bearer, client, matching_token
from host.config import Settings
from host.services import ANONYMOUS

COOKIE = "plughost_console"
LOGIN_COOKIE = "plughost_console_login"
COOKIE_PATH = "/console"
MAX_TOKEN_CHARS = 4096
# Bounds on what an unauthenticated crowd can make the server remember.
MAX_SESSIONS = 10_000
MAX_THROTTLED_ADDRESSES = 10_000


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    """One signed-in browser: what the server keeps (never the token)."""

    token_digest: bytes  # keyed digest of the token it was made from
    csrf: str
    expires: float  # time.monotonic() deadline


@dataclass(frozen=True)
class Visitor:
    """A console visitor: its principal (None: a visitor the API would
    refuse), the session it came with, and whether a bearer header sent it."""

    principal: Principal | None
    session: Session | None = None
    bearer_digest: bytes | None = None

    @property
    def signed_in(self) -> bool:
        return self.principal is not None and (
            self.session is not None or self.bearer_digest is not None
        )

    @property
    def admin(self) -> bool:
        return self.principal is not None and self.principal.admin


class SessionStore:
    """Sessions by the SHA-256 of their id; thread-safe and bounded (the
    oldest session goes when `MAX_SESSIONS` are open)."""

    def __init__(self, lifetime_s: float, max_sessions: int = MAX_SESSIONS) -> None:
        self.lifetime_s = lifetime_s
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def open(self, token_digest: bytes) -> str:
        """A new session for the token of `token_digest`; returns its id."""
        session_id = secrets.token_urlsafe(32)
        session = Session(token_digest, secrets.token_hex(32), time.monotonic() + self.lifetime_s)
        with self._lock:
            self._drop_expired()
            while len(self._sessions) >= self.max_sessions:
                self._sessions.popitem(last=False)
            self._sessions[_sha256(session_id)] = session
        return session_id

    def get(self, session_id: str | None) -> Session | None:
        """The live session with that id, or None (an expired one is dropped)."""
        if not session_id or len(session_id) > 128:
            return None
        key = _sha256(session_id)
        with self._lock:
            session = self._sessions.get(key)
            if session is not None and session.expires <= time.monotonic():
                del self._sessions[key]
                return None
            return session

    def close(self, session_id: str | None) -> None:
        """Forget the session with that id (sign-out); nothing if there is none."""
        if session_id:
            with self._lock:
                self._sessions.pop(_sha256(session_id), None)

    def _drop_expired(self) -> None:
        now = time.monotonic()
        # Every session lives as long: the oldest expire first.
        while self._sessions:
            key, session = next(iter(self._sessions.items()))
            if session.expires > now:
                break
            del self._sessions[key]


class LoginThrottle:
    """Failed sign-ins per address in a fixed window; thread-safe and bounded."""

    def __init__(self, failures: int, window_s: float) -> None:
        self.failures = failures
        self.window_s = window_s
        self._lock = threading.Lock()
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()  # start, count

    def retry_after(self, address: str) -> float | None:
        """Seconds until `address` may try again, or None when it may now."""
        with self._lock:
            found = self._live(address)
            if found is None or found[1] < self.failures:
                return None
            return max(0.0, found[0] + self.window_s - time.monotonic())

    def failed(self, address: str) -> int:
        """Count a failure of `address`; return its failures in the window."""
        with self._lock:
            start, count = self._live(address) or (time.monotonic(), 0)
            if address not in self._windows and len(self._windows) >= MAX_THROTTLED_ADDRESSES:
                self._windows.popitem(last=False)
            self._windows[address] = (start, count + 1)
            return count + 1

    def _live(self, address: str) -> tuple[float, int] | None:
        found = self._windows.get(address)
        if found is not None and found[0] + self.window_s <= time.monotonic():
            del self._windows[address]
            return None
        return found


def client_address(request: Request) -> str:
    """The address a sign-in is counted against: the peer (as uvicorn saw it,
    X-Forwarded-For from a trusted proxy included), an IPv6 one by its /64."""
    host = request.client.host if request.client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class ConsoleAuth:
    """Resolves visitors from their session or bearer header, opens and
    closes sessions, signs and checks CSRF tokens, and throttles sign-ins."""

    def __init__(self, settings: Settings, key: bytes | None = None) -> None:
        self.settings = settings
        self._key = key or secrets.token_bytes(32)
        self.sessions = SessionStore(settings.console_session_s)
        self.throttle = LoginThrottle(
            settings.console_login_failures, settings.console_login_window_s
        )

    @property
    def open_mode(self) -> bool:
        """No client tokens: every caller is anonymous, as in the API."""
        return not self.settings.client_tokens

    def _digest(self, token: str) -> bytes:
        return hmac.new(self._key, b"token\0" + token.encode(), hashlib.sha256).digest()

    def _principal_of_token(self, token: str | None) -> Principal | None:
        """The principal of a configured token (constant time), else None."""
        if token is None or len(token) > MAX_TOKEN_CHARS:
            return None
        admin = self.settings.admin_token
        if admin and matching_token(token, [admin]):
            return Principal(ADMIN, admin=True)
        found = matching_token(token, self.settings.client_tokens)
        return None if found is None else client(found, self.settings)

    def _principal_of_digest(self, digest: bytes) -> Principal | None:
        """The principal of the configured token whose digest is `digest`:
        None once that token is no longer configured."""
        found = None
        admin = self.settings.admin_token
        for token in [*([admin] if admin else []), *self.settings.client_tokens]:
            if hmac.compare_digest(self._digest(token), digest) and found is None:
                found = token
        return self._principal_of_token(found)

    def visitor(self, request: Request) -> Visitor:
        """Who sent `request`: the session of its cookie, else a bearer
        header's token; in open mode anybody else is `anonymous`."""
        session_id = request.cookies.get(COOKIE)
        session = self.sessions.get(session_id)
        if session is not None:
            principal = self._principal_of_digest(session.token_digest)
            if principal is not None:
                return Visitor(principal, session=session)
            self.sessions.close(session_id)  # its token was taken out of the configuration
        token = bearer(request)
        principal = self._principal_of_token(token)
        if principal is not None and token is not None:
            return Visitor(principal, bearer_digest=self._digest(token))
        return Visitor(Principal(ANONYMOUS) if self.open_mode else None)

    def sign_in(self, token: str) -> str | None:
        """A new session id for a configured token, or None for any other."""
        if self._principal_of_token(token) is None:
            return None
        return self.sessions.open(self._digest(token))

    def sign_out(self, request: Request) -> None:
        self.sessions.close(request.cookies.get(COOKIE))

    def csrf(self, visitor: Visitor) -> str:
        """The CSRF token for the forms `visitor` is shown ("" for none)."""
        if visitor.session is not None:
            return visitor.session.csrf
        if visitor.bearer_digest is not None:
            # A script with a bearer header; no browser sends one by itself.
            return hmac.new(self._key, b"bearer\0" + visitor.bearer_digest, "sha256").hexdigest()
        return ""

    def csrf_ok(self, visitor: Visitor, presented: str | None) -> bool:
        """True when `presented` is `visitor`'s CSRF token (constant time)."""
        expected = self.csrf(visitor)
        if not presented or not expected:
            return False
        return hmac.compare_digest(presented.encode(), expected.encode())

    def login_csrf(self, pre_session: str) -> str:
        """The sign-in form's CSRF field for the pre-session cookie's value."""
        return hmac.new(self._key, b"login\0" + pre_session.encode(), "sha256").hexdigest()

    def login_csrf_ok(self, request: Request, presented: str | None) -> bool:
        pre_session = request.cookies.get(LOGIN_COOKIE)
        if not presented or not pre_session or len(pre_session) > 128:
            return False
        return hmac.compare_digest(presented.encode(), self.login_csrf(pre_session).encode())

    def same_origin(self, request: Request) -> bool:
        """True when the request's Origin (or, without one, its Referer) is
        the console's own origin: `console_origin` when set, else the
        scheme and Host the request came with. A request with neither
        header (not a browser's) passes this check and still needs its
        CSRF field."""
        own = self.settings.console_origin or f"{request.url.scheme}://{request.url.netloc}"
        origin = request.headers.get("origin")
        if origin is None:
            referer = request.headers.get("referer")
            if referer is None:
                return True
            parts = urlsplit(referer)
            origin = f"{parts.scheme}://{parts.netloc}"
        return origin.rstrip("/").lower() == own.rstrip("/").lower()

    def secure_cookie(self, request: Request) -> bool:
        """Mark cookies Secure: as configured, else when served over HTTPS."""
        if self.settings.console_secure_cookie is not None:
            return self.settings.console_secure_cookie
        return request.url.scheme == "https"
