"""Completion callbacks: a job's (or a batch's) public view POSTed, signed,
to the URL its client gave, when the job (the batch) ends.

    POST /v1/jobs {callback_url}, POST /v1/batches {callback_url}
      │  CallbackService.check: the destination policy (destinations.py) → 400 if refused
      │  register: a PENDING row in the job store's outbox (callbackstore.py),
      │    subject_kind "job" or "batch" (a batch's items get none of their own)
      ▼
    the job ends / the batch ends (any node) ──▶ the row is due
    DELIVERERS threads (every serving node and worker node), each
      │  claims one due row under a lease (SKIP LOCKED in PostgreSQL), not
      │    of a client that has OWNER_SHARE deliveries under way on the node
      │  policy again: resolve once, check every address, connect to the
      │  checked address itself (Host header as given; TLS verified against the name)
      │  POST the subject's body (per kind: a job's public view, a batch's
      │    view with its first page of items), headers
      │    Plughost-Event (job.finished, batch.finished), Plughost-Delivery
      │    (the callback's id, the same on retries),
      │    Plughost-Signature: t=<unix time>,v1=<HMAC-SHA256 of "t.body">
      ▼
    settle: 2xx DELIVERED | policy refusal FAILED (no retry) | else PENDING
            again after backoff_s * 2**(attempt-1), FAILED after max_attempts

Delivery is at least once: a node that dies mid-delivery leaves its lease
to expire, and another node sends again (with the same delivery id). A
redirect is never followed; a response body is read up to
MAX_RESPONSE_BYTES and the rest dropped with the connection.

The signing key of each client is HMAC-SHA256(host secret, owner), in hex;
the host secret is 32 random bytes kept in the state directory (0600), or,
in a multi-node deployment, in the database, so every node signs alike.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import os
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from host.config import Settings
from host.errors import Rejected, envelope
from host.services.batchview import batch_body
from host.services.callbackstore import (
    DELIVERED,
    DELIVERING,
    FAILED,
    PENDING,
    Callback,
    Outbox,
    new_callback,
    outbox_for,
)
from host.services.destinations import CallbackPolicy, Destination, Refused, Unresolvable
from host.services.jobrows import JobStore

log = logging.getLogger("plughost.callbacks")

EVENT = "job.finished"
BATCH_EVENT = "batch.finished"
# The Plughost-Event of each subject kind's callbacks.
EVENTS = {"job": EVENT, "batch": BATCH_EVENT}
SIGNATURE_HEADER = "Plughost-Signature"
EVENT_HEADER = "Plughost-Event"
DELIVERY_HEADER = "Plughost-Delivery"
MAX_RESPONSE_BYTES = 64 * 1024
SECRET_FILE = "callback-secret"
SWEEP_EVERY_S = 60.0
# A callback whose subject is gone this long (its job pruned) is dropped.
SWEEP_AFTER_S = 300.0
# Threads that deliver on each node, each one callback at a time; a client
# has at most OWNER_SHARE of them at once, so receivers of one client that
# answer slowly (or never) cannot hold back another client's callbacks.
DELIVERERS = 8
OWNER_SHARE = 2
# The id a public document starts with (host/services/jobrows.py, `document`).
_LEADING_ID = re.compile(r'\{"id":"([^"\\]+)"')


@dataclass(frozen=True)
class CallbackSettings:
    """How callbacks go out (the `callback_*` settings in `host.config.Settings`)."""

    policy: CallbackPolicy
    max_attempts: int = 8
    backoff_s: float = 1.0
    timeout_s: float = 5.0
    poll_s: float = 0.25
    # Certificates https destinations are verified against: None, the system's.
    ca_file: str | None = None
    # The cap of a batch's items in its body (`max_list_bytes`, as one page of GET).
    max_body_bytes: int = 4 * 1024 * 1024

    @property
    def lease_s(self) -> float:
        """How long a claimed callback is held before another node may send it."""
        return self.timeout_s * 2 + 10.0


def callback_settings(settings: Settings, own_ports: tuple[int, ...]) -> CallbackSettings:
    """The callback settings of a `host.config.Settings`; `own_ports`: the
    ports this node listens on (never a destination on its own addresses)."""
    return CallbackSettings(
        CallbackPolicy.of(settings.callback_allow, settings.callback_allow_networks, own_ports),
        max_attempts=settings.callback_max_attempts,
        backoff_s=settings.callback_backoff_s,
        timeout_s=settings.callback_timeout_s,
        max_body_bytes=settings.max_list_bytes,
    )


def callback_service(
    settings: Settings,
    store: JobStore,
    secret: Callable[[], bytes],
    own_ports: tuple[int, ...] = (),
) -> CallbackService:
    """Callbacks of jobs in `store` under `settings`' policy, signed with
    keys derived from `secret` (not started). The server's own port is never
    a destination on its own addresses, nor are `own_ports`."""
    config = callback_settings(settings, (settings.port, *own_ports))
    return CallbackService(config, outbox_for(store), secret, renders(store, config))


# -- secrets and signatures ---------------------------------------------------


def file_secret(state_dir: str | Path) -> Callable[[], bytes]:
    """The host secret kept in `state_dir`, created (0600) on first use."""
    path = Path(state_dir) / SECRET_FILE

    def read() -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fresh = path.with_name(f".{SECRET_FILE}.{secrets.token_hex(4)}")
            fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, secrets.token_bytes(32))
            finally:
                os.close(fd)
            try:
                os.link(fresh, path)  # a racing process's secret wins if it was first
            except FileExistsError:
                log.debug("another process created the callback secret first")
            finally:
                fresh.unlink()
            return path.read_bytes()

    return read


def database_secret(store: JobStore) -> Callable[[], bytes]:
    """The host secret kept in PostgreSQL (`plughost_secrets`), created once:
    every node of a deployment reads the same."""

    def read() -> bytes:
        with store._rows() as rows:
            conn = rows.connection  # type: ignore[attr-defined]
            conn.execute(
                "INSERT INTO plughost_secrets (name, value) VALUES ('callback', %s) "
                "ON CONFLICT DO NOTHING",
                (secrets.token_bytes(32),),
            )
            row = conn.execute(
                "SELECT value FROM plughost_secrets WHERE name = 'callback'", ()
            ).fetchone()
        return bytes(row[0])

    return read


def client_secret(host_secret: bytes, owner: str) -> str:
    """The signing secret of client `owner`: HMAC-SHA256(host secret, owner), hex."""
    return hmac.new(host_secret, owner.encode(), hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, at: int) -> str:
    """The `Plughost-Signature` value of `body` sent at unix time `at`."""
    mac = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


def verify(secret: str, body: bytes, header: str, now: float, tolerance_s: float = 300) -> bool:
    """Does `header` sign `body` with `secret`, at most `tolerance_s` from `now`?"""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if not fields.get("t", "").isdigit() or abs(now - int(fields["t"])) > tolerance_s:
        return False
    expected = sign(secret, body, int(fields["t"])).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


# -- one HTTP attempt ---------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """How one attempt went: the HTTP status, or the error in words."""

    status: int | None
    error: str | None
    duration_ms: float


def _cut(sock: socket.socket, cut: threading.Event) -> None:
    cut.set()
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        log.debug("callback connection already closed at its deadline")


def _exchange(
    sock: socket.socket, dest: Destination, address: str, body: bytes, headers: Mapping[str, str]
) -> int:
    """Send the request over `sock` (connected to `address`), read at most
    MAX_RESPONSE_BYTES of the answer; its HTTP status."""
    conn = http.client.HTTPConnection(address, dest.port, timeout=sock.gettimeout())
    conn.sock = sock
    conn.putrequest("POST", dest.target, skip_host=True, skip_accept_encoding=True)
    for name, value in {"Host": dest.host_header, **headers}.items():
        conn.putheader(name, value)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    response = conn.getresponse()
    response.read(MAX_RESPONSE_BYTES)  # the rest is dropped with the connection
    return response.status


def post(
    dest: Destination,
    address: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout_s: float,
    ca_file: str | None = None,
) -> Answer:
    """POST `body` to `dest` over a connection to `address` (already
    checked), within `timeout_s` in all (connect, TLS, send, answer): an
    answer the deadline cut short is no answer. For https the certificate
    is verified against `dest`'s host name (with `ca_file`'s certificates,
    else the system's). A redirect is not followed; at most
    MAX_RESPONSE_BYTES of the answer are read."""
    started = time.monotonic()
    opened: list[socket.socket] = []
    timer: threading.Timer | None = None
    cut = threading.Event()
    status: int | None = None
    error: str | None = None
    try:
        sock = socket.create_connection((address, dest.port), timeout=timeout_s)
        # The deadline shuts down a duplicate of the descriptor: that cuts the
        # connection whichever socket object holds it by then (TLS detaches `sock`).
        opened += [sock, sock.dup()]
        left = max(0.0, timeout_s - (time.monotonic() - started))
        timer = threading.Timer(left, _cut, (opened[1], cut))
        timer.start()
        if dest.scheme == "https":
            context = ssl.create_default_context(cafile=ca_file)
            sock = context.wrap_socket(sock, server_hostname=dest.host)
            opened.append(sock)
        status = _exchange(sock, dest, address, body, headers)
        timer.cancel()
        if cut.is_set():
            status, error = None, f"no complete answer within {timeout_s:g} s"
        elif 300 <= status < 400:
            error = f"answered {status} (a redirect): not followed"
        elif not 200 <= status < 300:
            error = f"answered {status}"
    except (OSError, http.client.HTTPException) as exc:
        if cut.is_set() or time.monotonic() - started >= timeout_s * 0.99:
            error = f"no complete answer within {timeout_s:g} s"
        elif isinstance(exc, OSError):
            error = f"{type(exc).__name__}: {exc}"[:300]
        else:  # its message quotes the answer, which the client is never shown
            error = f"not an HTTP answer ({type(exc).__name__})"
    finally:
        if timer is not None:
            timer.cancel()
        for opened_sock in opened:
            opened_sock.close()
    return Answer(status, error, round((time.monotonic() - started) * 1000, 1))


# -- the service ----------------------------------------------------------------

Render = Callable[[str], str | None]


def job_body(store: JobStore) -> Render:
    """A job's public document (as GET /v1/jobs/{id} gives it), None once it is gone."""

    def render(job_id: str) -> str | None:
        found = store.document(job_id)
        return None if found is None else found[1]

    return render


def renders(store: JobStore, config: CallbackSettings) -> dict[str, Render]:
    """The body of each subject kind's callbacks, read from `store`."""
    return {"job": job_body(store), "batch": batch_body(store, config.max_body_bytes)}


def splice(document: str, callback: Callback | None) -> str:
    """`document` (a JSON object) with the callback's public view as `callback`."""
    if callback is None:
        return document
    view = json.dumps(callback.public(), separators=(",", ":"))
    return f'{document.rstrip()[:-1]},"callback":{view}}}'


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


class CallbackService:
    """Checks, records and delivers callbacks; thread-safe. `render` gives
    each subject kind's body by id (`renders`: a job's, a batch's)."""

    def __init__(
        self,
        config: CallbackSettings,
        outbox: Outbox,
        host_secret: Callable[[], bytes],
        render: Mapping[str, Render],
    ) -> None:
        self.config = config
        self.outbox = outbox
        self._host_secret = host_secret
        self._secret: bytes | None = None
        self._render = dict(render)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._claiming = threading.Lock()  # a claim, and the count of its owner
        self._under_way: dict[str, int] = {}  # owner -> deliveries under way here

    @property
    def enabled(self) -> bool:
        return self.config.policy.enabled

    # -- at submit -------------------------------------------------------------

    def check(self, url: str) -> None:
        """Raises Rejected (`invalid_input`) naming why `url` may not be a
        callback destination of this host."""
        try:
            self.config.policy.check(url)
        except (Refused, Unresolvable) as exc:
            raise Rejected(envelope("invalid_input", str(exc), field="callback_url")) from exc

    def register(self, owner: str, kind: str, subject_id: str, url: str) -> Callback:
        """Record the callback of a subject: sent once the subject ends."""
        callback = new_callback(owner, kind, subject_id, url, time.time())
        self.outbox.add(callback)
        return callback

    def document(self, kind: str, subject_id: str, document: str) -> str:
        """The subject's public `document` with its callback's view, if it has one."""
        return splice(document, self.outbox.of_subject(kind, subject_id))

    def documents(self, kind: str, documents: list[str]) -> list[str]:
        """Public documents of subjects (each starting `{"id":"<id>"`, as
        a listing's do), each with its callback's view if it has one."""
        ids = [found[1] for d in documents if (found := _LEADING_ID.match(d))]
        held = self.outbox.of_subjects(kind, ids)
        if not held:
            return documents
        spliced = []
        for document in documents:
            found = _LEADING_ID.match(document)
            spliced.append(splice(document, held.get(found[1]) if found else None))
        return spliced

    def secret_for(self, owner: str) -> str:
        """The signing secret of client `owner`."""
        if self._secret is None:
            self._secret = self._host_secret()
        return client_secret(self._secret, owner)

    # -- delivery --------------------------------------------------------------

    def deliver_due(self, limit: int = DELIVERERS * 2) -> int:
        """Claim the due callbacks (at most `limit`) and send each once, one
        after another, in this thread; return how many."""
        claimed = self.outbox.claim(time.time(), self.config.lease_s, limit)
        for callback in claimed:
            self._attempt(callback)
        return len(claimed)

    def _claim_one(self) -> Callback | None:
        """A due callback of a client with fewer than OWNER_SHARE deliveries
        under way on this node, counted as under way; None if there is none."""
        with self._claiming:
            full = frozenset(o for o, n in self._under_way.items() if n >= OWNER_SHARE)
            claimed = self.outbox.claim(time.time(), self.config.lease_s, 1, full)
            if not claimed:
                return None
            owner = claimed[0].owner
            self._under_way[owner] = self._under_way.get(owner, 0) + 1
            return claimed[0]

    def _done(self, owner: str) -> None:
        with self._claiming:
            left = self._under_way.pop(owner, 1) - 1
            if left:
                self._under_way[owner] = left

    def _attempt(self, callback: Callback) -> None:
        """One attempt at `callback` (held under its lease); its outcome settled."""
        settled = self._outcome(callback)
        if not self.outbox.settle(settled):
            log.warning("callback %s: lease lost before its outcome was written", callback.id)
        log.info(
            "callback attempt",
            extra={
                "callback": callback.id,
                "subject": callback.subject_id,
                "state": settled.state,
                "attempt": len(settled.attempts),
                "outcome": settled.attempts[-1] if settled.attempts else None,
            },
        )

    def _outcome(self, callback: Callback) -> Callback:
        at = _now_iso()
        started = time.monotonic()
        try:
            dest, address = self.config.policy.check(callback.url)
        except Refused as exc:
            return self._after(callback, {"at": at, "duration_ms": 0.0, "error": str(exc)}, True)
        except Unresolvable as exc:
            answer = Answer(None, str(exc), round((time.monotonic() - started) * 1000, 1))
            return self._after(callback, self._record(at, answer), False)
        body = self._render[callback.subject_kind](callback.subject_id)
        if body is None:  # its subject was pruned before the callback went out
            gone = {
                "at": at,
                "duration_ms": 0.0,
                "error": f"its {callback.subject_kind} no longer exists",
            }
            return self._after(callback, gone, True)
        data = splice(body, replace(callback, state=DELIVERING)).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "plughost-callbacks",
            EVENT_HEADER: EVENTS[callback.subject_kind],
            DELIVERY_HEADER: callback.id,
            SIGNATURE_HEADER: sign(self.secret_for(callback.owner), data, int(time.time())),
        }
        answer = post(dest, address, data, headers, self.config.timeout_s, self.config.ca_file)
        return self._after(callback, self._record(at, answer), False, answer.error is None)

    @staticmethod
    def _record(at: str, answer: Answer) -> dict[str, Any]:
        attempt: dict[str, Any] = {"at": at, "duration_ms": answer.duration_ms}
        if answer.status is not None:
            attempt["status"] = answer.status
        if answer.error is not None:
            attempt["error"] = answer.error
        return attempt

    def _after(
        self, callback: Callback, attempt: dict[str, Any], final: bool, delivered: bool = False
    ) -> Callback:
        """`callback` after `attempt`: DELIVERED, FAILED (`final`, or its last
        attempt) or PENDING again after its backoff."""
        attempts = (*callback.attempts, attempt)
        if delivered:
            return replace(callback, state=DELIVERED, attempts=attempts)
        if final or len(attempts) >= self.config.max_attempts:
            return replace(callback, state=FAILED, attempts=attempts)
        delay = self.config.backoff_s * 2 ** (len(attempts) - 1)
        return replace(
            callback, state=PENDING, attempts=attempts, next_attempt_at=time.time() + delay
        )

    # -- the deliverer thread -------------------------------------------------

    def start(self) -> None:
        """Start delivering in DELIVERERS threads (no-op when callbacks are off)."""
        if not self.enabled or self._threads:
            return
        for n in range(DELIVERERS):
            thread = threading.Thread(
                target=self._deliver_forever,
                args=(n == 0,),
                name=f"plughost-callback-{n}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    def _deliver_forever(self, sweeps: bool) -> None:
        """Deliver due callbacks one at a time until stopped; the thread that
        `sweeps` also drops callbacks whose subject is gone."""
        last_sweep = 0.0
        while not self._stop.is_set():
            callback = None
            try:
                if sweeps and time.monotonic() - last_sweep > SWEEP_EVERY_S:
                    last_sweep = time.monotonic()
                    self.outbox.sweep(time.time() - SWEEP_AFTER_S)
                callback = self._claim_one()
                if callback is not None:
                    self._attempt(callback)
            # The deliverer's boundary: a database outage or a bug in one
            # attempt must not end delivery for good; the next claim retries.
            except Exception:
                log.exception("callback delivery failed")
            finally:
                if callback is not None:
                    self._done(callback.owner)
            if callback is None and self._wake.wait(self.config.poll_s):
                self._wake.clear()

    def wake(self) -> None:
        """A subject ended on this node: look for due callbacks now, not at the next poll."""
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop delivering; a delivery under way finishes (its timeout bounds it)."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))


__all__ = [
    "BATCH_EVENT",
    "DELIVERY_HEADER",
    "EVENT",
    "EVENTS",
    "EVENT_HEADER",
    "MAX_RESPONSE_BYTES",
    "SIGNATURE_HEADER",
    "Answer",
    "CallbackService",
    "CallbackSettings",
    "callback_service",
    "callback_settings",
    "client_secret",
    "database_secret",
    "file_secret",
    "job_body",
    "post",
    "renders",
    "sign",
    "splice",
    "verify",
]
