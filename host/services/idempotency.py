"""Idempotency keys: a client's `Idempotency-Key` on a request that creates
a job, and the digest that tells the same request from a different one.

    key + request ──digest──▶ Idempotency(key, digest) ──▶ JobStore.add
                                                 held by a job already?
                                   same digest: that job   other: IdempotencyConflict

The store holds one job per (owner, key) (jobrows.py); a key is free again
once its job is pruned.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from host.errors import IdempotencyConflict, Rejected, envelope
from host.services.jobrows import Idempotency, Job, Keyed

HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 255


def checked_key(value: str | None) -> str | None:
    """The header's key, or None without one. Raises Rejected
    (`invalid_input`) unless it is 1-255 printable ASCII characters."""
    if value is None:
        return None
    if not 1 <= len(value) <= MAX_KEY_CHARS or not (value.isascii() and value.isprintable()):
        raise Rejected(
            envelope(
                "invalid_input",
                f"the {HEADER} header must be 1-{MAX_KEY_CHARS} printable ASCII characters",
                header=HEADER,
            )
        )
    return value


def _image_bytes(image: Any) -> bytes:
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    try:
        return base64.b64decode(str(image), validate=True)
    except (binascii.Error, ValueError):
        return str(image).encode("utf-8", "surrogatepass")


def request_digest(plugin: str, payload: Any, callback_url: str | None = None) -> str:
    """SHA-256 of what makes a request the same: the plugin, the image's
    bytes (sent as base64 or as a file alike), its mime_type and options,
    and its callback URL if it has one (a request without one digests as
    it did before callbacks existed)."""
    fields = payload if isinstance(payload, dict) else {"payload": payload}
    meta = {
        "plugin": plugin,
        "mime_type": fields.get("mime_type"),
        "options": fields.get("options"),
    }
    if callback_url is not None:
        meta["callback_url"] = callback_url
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=repr).encode())
    digest.update(b"\0")
    digest.update(_image_bytes(fields.get("image", b"")))
    return digest.hexdigest()


def replayed(held: Keyed, idem: Idempotency) -> Job:
    """The job held by the key, if it was created by the same request.
    Raises IdempotencyConflict otherwise."""
    job, digest = held
    if digest != idem.digest:
        raise IdempotencyConflict(idem.key, job.id)
    return job
