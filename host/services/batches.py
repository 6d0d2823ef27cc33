"""BatchService: many images for one plugin under one id (`POST /v1/batches`).

    create(plugin, payloads, owner, key, callback_url)
      |  every item checked as a job is (PluginManagementService.check):
      |    one bad item refuses the whole batch, naming its index (400)
      |  a callback_url checked as POST /v1/jobs checks its own (400)
      |  a known Idempotency-Key: that batch, nothing created
      |  the owner's quota makes room for all the items at once, or the
      |    whole batch is refused (429)
      |  the batch's callback, if any: a PENDING row of the outbox, kind "batch"
      |    (host/services/callbackstore.py), written just before the batch
      |  ONE transaction (lock, for the memory store): the batch row and every
      |    item as a PENDING job with its batch_id (host/services/batchrows.py);
      |    in PostgreSQL each item is queued in it too, item i at priority
      |    -(i + the owner's PENDING jobs): clients take turns
      v
    single node: BatchFeeder (host/services/batchfeed.py) hands the items to
    the pool a few at a time; multi-node: worker nodes take them by priority

Each item is an ordinary job (GET /v1/jobs/{id}, DELETE /v1/jobs/{id}). A
batch ends when its last item ends: `batch_ended` (batchrows.py) decides
it once in the store, wherever that item ran; its callback is due from
then on (the batch's view, `batch_body`, POSTed as `batch.finished`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from host.errors import (
    JobFinished,
    JobNotFound,
    QuotaExceeded,
    Rejected,
    ServiceError,
    ShuttingDown,
    envelope,
)
from host.services.batchfeed import BatchFeeder
from host.services.batchrows import (
    Batch,
    BatchStore,
    KeyedBatch,
    batch_ended,
    job_ended,
    rows_of,
)
from host.services.batchview import BatchPage, batch_body, find_batch, read_page, summary
from host.services.idempotency import request_digest
from host.services.jobrows import (
    FINISHED,
    Idempotency,
    Job,
    JobStatus,
    now_iso,
    retention_cutoff,
)
from host.services.jobs import PRUNE_EVERY_S, JobManagementService
from host.services.payloads import AnalyzeBody, JsonBounds, parse_analyze
from host.services.plugins import PluginManagementService
from host.services.runners import CLOSED
from sandbox.jsonbounds import BoundsExceeded, NotJson, scan

__all__ = [
    "DEFAULT_MAX_ITEMS",
    "Batch",
    "BatchService",
    "batch_body",
    "batch_ended",
    "item_rejected",
    "job_ended",
    "parse_batch",
]

log = logging.getLogger("plughost.batches")
DEFAULT_MAX_ITEMS = 100
BATCH_FIELDS = ("plugin", "items", "options", "callback_url")


def _invalid(message: str, **details: Any) -> Rejected:
    return Rejected(envelope("invalid_input", message, **details))


def item_rejected(index: int, exc: Rejected) -> Rejected:
    """`exc` (an item's refusal) as the whole batch's: its message led by
    `items[index]`, the index in its details."""
    error = exc.envelope["error"]
    details = {k: v for k, v in error.get("details", {}).items() if k != "reason"}
    return Rejected(
        envelope(
            error["details"]["reason"],
            f"items[{index}]: {error['message']}; nothing of the batch was stored",
            error.get("plugin"),
            **{**details, "index": index},
        )
    )


def _loads(buffer: bytearray) -> Any:
    try:
        return json.loads(buffer)
    except (ValueError, RecursionError) as exc:  # the scan bounds depth; belt and braces
        raise _invalid("request body is not valid JSON") from exc


@dataclass(frozen=True)
class BatchBody:
    """A parsed batch request."""

    plugin: str | None
    items: list[AnalyzeBody]
    callback_url: str | None = None


def parse_batch(buffer: bytearray, bounds: JsonBounds, max_items: int, max_bytes: int) -> BatchBody:
    """Parse a batch body: its plugin, items and callback URL. Each item is parsed as the
    body of `POST /v1/jobs` is (`parse_analyze`, the same caps), with the
    batch's `options` when it has none; the items so expanded hold at most
    `max_bytes` (max_request_bytes) together, as the body itself does.
    Raises Rejected (invalid_input) naming the field, the cap, or the item's index."""
    # The caps of one request body for each item, and the batch's depth around them.
    whole = JsonBounds(
        bounds.max_depth + 3, bounds.max_items * (max_items + 1) + 16, max(len(buffer), 1)
    )
    try:
        scan(buffer, whole, name="request body")
    except BoundsExceeded as exc:
        raise _invalid(str(exc)) from exc
    except NotJson as exc:
        raise _invalid(f"request body is not a valid JSON object: {exc}") from exc
    body = _loads(buffer)
    if not isinstance(body, dict):
        raise _invalid("request body must be a JSON object with 'plugin' and 'items'")
    unknown = [repr(name[:40]) for name in body if name not in BATCH_FIELDS]
    if unknown:
        raise _invalid(f"request body has unknown fields: {', '.join(unknown[:5])}")
    plugin, items, options = body.get("plugin"), body.get("items"), body.get("options", {})
    if plugin is not None and not isinstance(plugin, str):
        raise _invalid("field 'plugin' must be a string")
    if not isinstance(options, dict):
        raise _invalid("field 'options' must be an object")
    callback_url = body.get("callback_url")
    if callback_url is not None and not isinstance(callback_url, str):
        raise _invalid("field 'callback_url' must be a string")
    if not isinstance(items, list) or not 1 <= len(items) <= max_items:
        count = f"{len(items)} items" if isinstance(items, list) else "no list"
        raise _invalid(
            f"field 'items' must be a list of 1 to {max_items} images (max_batch_items); "
            f"got {count}",
            max_batch_items=max_items,
        )
    _check_expansion(len(buffer), items, options, max_bytes)
    parsed = [_item(index, item, options, bounds) for index, item in enumerate(items)]
    return BatchBody(plugin, parsed, callback_url)


def _check_expansion(
    body_bytes: int, items: list[Any], options: dict[str, Any], max_bytes: int
) -> None:
    """Refuse a batch whose `options`, copied into each item that gives
    none, would make its items larger than `max_bytes` together: a body
    within the size limit must not become a hundred times its size."""
    if not options:
        return
    inheriting = sum(1 for item in items if isinstance(item, dict) and "options" not in item)
    size = len(json.dumps(options, separators=(",", ":")).encode())
    if body_bytes + (inheriting - 1) * size > max_bytes:
        raise _invalid(
            f"field 'options' ({size} bytes) is copied into each of the {inheriting} items "
            f"that give no options of their own, which makes the batch larger than "
            f"max_request_bytes ({max_bytes} bytes): send smaller batch options, or fewer items",
            max_request_bytes=max_bytes,
            options_bytes=size,
            items_inheriting=inheriting,
        )


def _item(index: int, item: Any, options: dict[str, Any], bounds: JsonBounds) -> AnalyzeBody:
    if not isinstance(item, dict):
        raise _invalid(
            f"items[{index}] must be an object with 'image' and 'mime_type'", index=index
        )
    for name in ("plugin", "callback_url"):
        if name in item:
            raise _invalid(
                f"items[{index}]: field '{name}' belongs to the batch, not to an item",
                index=index,
            )
    text = bytearray(json.dumps({"options": options, **item}).encode())
    try:
        return parse_analyze(text, bounds)
    except Rejected as exc:
        raise item_rejected(index, exc) from exc


def batch_digest(
    plugin: str, payloads: Sequence[dict[str, Any]], callback_url: str | None = None
) -> str:
    """SHA-256 of what makes a batch request the same: its plugin, each
    item's request (`request_digest`), in order, and its callback URL if it
    has one (a batch without one digests as it did before callbacks)."""
    digest = hashlib.sha256(plugin.encode())
    for payload in payloads:
        digest.update(request_digest(plugin, payload).encode())
    if callback_url is not None:
        digest.update(b"\0callback_url\0" + callback_url.encode())
    return digest.hexdigest()


def _input_bytes(payload: dict[str, Any]) -> int:
    """What an item's input takes in the store, as the job quota counts it."""
    return len(payload["image"]) + len(repr(payload.get("options"))) + len(payload["mime_type"])


class BatchService:
    """Creates, reads, lists and cancels batches of `jobs`' jobs; thread-safe."""

    def __init__(self, plugins: PluginManagementService, jobs: JobManagementService) -> None:
        self.plugins = plugins
        self.jobs = jobs
        # A single node feeds its pool; worker nodes take items by priority.
        self.feeder = BatchFeeder(jobs) if jobs.runner.in_process else None
        self._last_prune = time.monotonic()
        self.end_stale()

    def end_stale(self) -> int:
        """End the batches whose items all ended without their end being
        recorded (the items of a host that stopped end INTERRUPTED at its
        next start); return how many. A store that cannot be read now
        leaves them to the next start."""
        if not isinstance(self.jobs.store, BatchStore):
            return 0  # a store of jobs alone
        try:
            with rows_of(self.jobs.store) as rows:
                unended = rows.unended()
        except ServiceError as exc:  # the shared database unreachable at start-up
            log.warning("batches not checked for their end: %s", exc)
            return 0
        ended = sum(batch_ended(self.jobs.store, batch_id) for batch_id in unended)
        if ended:
            self._wake()
        return ended

    def _maybe_prune(self) -> None:
        """Drop the batches past retention whose items were all pruned (once a minute)."""
        if time.monotonic() - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = time.monotonic()
        with rows_of(self.jobs.store) as rows:
            pruned = rows.prune(retention_cutoff(self.jobs.limits.retention_s))
        if pruned:
            log.info("pruned %d batches past retention with no job left", pruned)

    # -- creating -----------------------------------------------------------

    def create(
        self,
        plugin: str,
        payloads: Sequence[dict[str, Any]],
        owner: str,
        key: str | None = None,
        max_items: int = DEFAULT_MAX_ITEMS,
        callback_url: str | None = None,
    ) -> Batch:
        """Store a batch of `owner`: one PENDING job per payload, all or
        none, and start them. With an idempotency `key` `owner` used
        before, that batch (nothing created). With a `callback_url` (checked
        as POST /v1/jobs checks its own), the batch's view is POSTed there
        once it ends. Raises Rejected (an item's refusal names its index; a
        refused callback_url), QuotaExceeded (the whole batch does not fit),
        ServiceError `idempotency_key_reused`, the runner's refusal, or
        ShuttingDown (the host stopped starting jobs)."""
        self._check(plugin, payloads, max_items, callback_url)
        digest = batch_digest(plugin, payloads, callback_url)
        idem = None if key is None else Idempotency(key, digest)
        if idem is not None and (held := self._keyed(owner, idem.key)) is not None:
            return _replayed(held, idem)
        if idem is not None and (job := self.jobs.store.keyed(owner, idem.key)) is not None:
            # The key holds a job: one of its own, or the first item of a
            # batch a racing retry stored since the look above (a batch and
            # its items are stored together: look again).
            if (held := self._keyed(owner, idem.key)) is not None:
                return _replayed(held, idem)
            raise _held_by_job(idem, job[0].id)
        if not self.jobs.runner.in_process:
            self.jobs.runner.admit(plugin)  # a live worker serves the plugin, or 503
            self.jobs.runner.withdraw()
        elif self.jobs.stopping:  # its items would never be fed: refused as a job is
            raise ShuttingDown(CLOSED)
        batch, items = _new_batch(plugin, payloads, owner)
        stored = self._store(batch, items, idem, callback_url)
        if not stored:
            assert idem is not None  # only a held key refuses a batch
            held = self._keyed(owner, idem.key)
            if held is None:
                raise RuntimeError(f"idempotency key of batch {batch.id} neither free nor held")
            return _replayed(held, idem)
        log.info(
            "batch accepted",
            extra={"batch_id": batch.id, "plugin": plugin, "items": len(items), "owner": owner},
        )
        if self.feeder is not None:
            self.feeder.add(batch.id, plugin, list(batch.job_ids), owner)
        self._maybe_prune()
        return batch

    def _check(
        self,
        plugin: str,
        payloads: Sequence[dict[str, Any]],
        max_items: int,
        callback_url: str | None,
    ) -> None:
        """Raises Rejected for a batch of that many `payloads` for `plugin`,
        one of them, or its `callback_url`, if it may not be stored."""
        if not 1 <= len(payloads) <= max_items:
            raise _invalid(f"a batch holds 1 to {max_items} images, not {len(payloads)}")
        for index, payload in enumerate(payloads):
            try:
                self.plugins.check(plugin, payload)
            except Rejected as exc:
                if exc.reason != "invalid_input":
                    raise  # the plugin's refusal (unknown, quarantined): the batch's
                raise item_rejected(index, exc) from exc
        if callback_url is not None:
            self.jobs.check_callback(callback_url)

    def _store(
        self,
        batch: Batch,
        items: list[tuple[Job, dict[str, Any]]],
        idem: Idempotency | None,
        callback_url: str | None,
    ) -> bool:
        incoming = sum(_input_bytes(payload) for _, payload in items)
        try:
            if callback_url is not None and self.jobs.callbacks is not None:
                # Before the batch, so a stored batch never lacks its
                # callback; one whose batch never came (refused, or the
                # host died between the two) is swept (callbackstore.py).
                self.jobs.callbacks.register(batch.owner, "batch", batch.id, callback_url)
            with rows_of(self.jobs.store) as rows:
                self.jobs.admit_batch(rows, batch.owner, incoming, len(items))
                return rows.insert(batch, items, idem)
        except QuotaExceeded as exc:
            error = exc.envelope["error"]
            details = {k: v for k, v in error["details"].items() if k != "reason"}
            raise ServiceError(
                envelope(
                    "quota_exceeded",
                    f"the batch's {len(items)} jobs do not fit the client's quota, so the "
                    f"whole batch was refused: {error['message']}",
                    **{**details, "batch_jobs": len(items)},
                )
            ) from exc

    def _keyed(self, owner: str, key: str) -> KeyedBatch | None:
        with rows_of(self.jobs.store) as rows:
            return rows.keyed(owner, key)

    # -- reading ------------------------------------------------------------

    def get(
        self, batch_id: str, owner: str | None, limit: int, offset: int, max_bytes: int
    ) -> BatchPage:
        """The batch and a page of its items from `offset` (at most `limit`
        and `max_bytes` of documents, one at least), if `owner` (None: anyone)
        owns it. Raises ServiceError `not_found`, the same for another
        owner's batch as for none."""
        return read_page(self.jobs.store, batch_id, owner, limit, offset, max_bytes)

    def document(
        self, batch_id: str, owner: str | None, limit: int, offset: int, max_bytes: int
    ) -> str:
        """The JSON body of GET /v1/batches/{id} (see `get`), with the
        batch's callback (`callback`: url, state, attempts) if it has one."""
        page = self.get(batch_id, owner, limit, offset, max_bytes)
        view = page.view(limit, offset)
        if self.jobs.callbacks is None:
            return view
        return self.jobs.callbacks.document("batch", batch_id, view)

    def list_batches(
        self, owner: str | None, limit: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        """`owner`'s batches (None: everyone's), newest first, without
        their items; and how many there are."""
        with rows_of(self.jobs.store) as rows:
            found = rows.newest(owner, limit, offset)
            return [summary(b, rows.counts(b.id)) for b in found], rows.count(owner)

    # -- cancelling ---------------------------------------------------------

    def cancel(self, batch_id: str, owner: str | None, wait_s: float = 5.0) -> Batch:
        """Cancel every unfinished item of the batch, if `owner` (None:
        anyone) owns it: pending ones never run, running sandboxes are
        killed (each as `DELETE /v1/jobs/{id}`). Waits up to `wait_s` for
        them to end. Raises ServiceError `not_found`, or `job_finished`
        when no item was left to cancel."""
        with rows_of(self.jobs.store) as rows:
            batch = find_batch(rows, batch_id, owner)
        unfinished = self._unfinished(batch)
        if not unfinished:
            raise ServiceError(
                envelope("job_finished", f"batch {batch_id} is FINISHED already", status="FINISHED")
            )
        if self.feeder is not None:
            self.feeder.drop(batch_id)
        cancelled = [job for job in unfinished if self._cancel_one(job)]
        log.info("batch cancel requested", extra={"batch_id": batch_id, "items": len(cancelled)})
        deadline = time.monotonic() + wait_s
        while self._unfinished(batch) and time.monotonic() < deadline:
            time.sleep(0.02)  # whoever runs an item records its end
        if batch_ended(self.jobs.store, batch_id):
            self._wake()
        return batch

    def _wake(self) -> None:
        """A batch ended: its callback, if it has one, is due now."""
        if self.jobs.callbacks is not None:
            self.jobs.callbacks.wake()

    def _unfinished(self, batch: Batch) -> list[Job]:
        found = (self.jobs.store.get(job_id) for job_id in batch.job_ids)
        return [job for job in found if job is not None and job.status not in FINISHED]

    def _cancel_one(self, job: Job) -> bool:
        try:
            self.jobs.runner.cancel(job)
        except (JobFinished, JobNotFound):
            return False  # it ended meanwhile
        return True


def _new_batch(
    plugin: str, payloads: Sequence[dict[str, Any]], owner: str
) -> tuple[Batch, list[tuple[Job, dict[str, Any]]]]:
    created = now_iso()
    jobs = [
        Job(uuid.uuid4().hex, plugin, JobStatus.PENDING, created, owner=owner) for _ in payloads
    ]
    batch = Batch(uuid.uuid4().hex, owner, plugin, created, tuple(job.id for job in jobs))
    return batch, list(zip(jobs, (dict(p) for p in payloads), strict=True))


def _held_by_job(idem: Idempotency, job_id: str) -> ServiceError:
    """The refusal of a batch whose key holds a job of POST /v1/jobs."""
    return ServiceError(
        envelope(
            "idempotency_key_reused",
            "this Idempotency-Key was used for a job (POST /v1/jobs), not a batch; "
            "use a new key for a new request",
            key=idem.key,
            job_id=job_id,
        )
    )


def _replayed(held: KeyedBatch, idem: Idempotency) -> Batch:
    """The batch held by the key, if the same request created it."""
    batch, digest = held
    if digest != idem.digest:
        raise ServiceError(
            envelope(
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different batch (plugin, images, "
                "mime types or options); use a new key for a new request",
                key=idem.key,
                batch_id=batch.id,
            )
        )
    return batch
