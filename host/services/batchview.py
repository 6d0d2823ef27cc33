"""A batch as GET /v1/batches/{id} shows it, read from any store that keeps
batches: its summary (status, counts), a bounded page of its items, and the
body of its completion callback.

    read_page(store, id, owner, limit, offset, max_bytes) ──▶ BatchPage
      BatchPage.view(limit, offset)   the JSON body of GET /v1/batches/{id}
    batch_body(store, max_bytes)      the body of its callback (host/services/
                                      callbacks.py): the view with the first page
                                      of items, `items_truncated` if some were left out

Here rather than in host/services/batches.py so that the callback deliverer
(of every node, a worker node's included) reads batches without the batch
service.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from host.errors import ServiceError, envelope
from host.services.batchrows import Batch, BatchRows, batch_status, rows_of
from host.services.jobrows import RawJob

# The most items one page of a batch's view holds (GET /v1/batches/{id}?limit=).
MAX_PAGE_ITEMS = 10_000


def _not_found(batch_id: str) -> ServiceError:
    return ServiceError(envelope("not_found", f"no batch with id {batch_id[:80]!r}"))


@dataclass(frozen=True)
class BatchPage:
    """A batch as `GET /v1/batches/{id}` shows it, its items' documents
    serialized (results spliced in unparsed)."""

    batch: Batch
    counts: dict[str, int]
    items: list[str]
    next_offset: int | None
    truncated: bool

    def head(self) -> dict[str, Any]:
        """Everything but the items."""
        return summary(self.batch, self.counts)

    def view(self, limit: int, offset: int, **extra: Any) -> str:
        """The JSON body of GET /v1/batches/{id} (`extra` fields after it),
        the items' stored documents spliced in."""
        head = json.dumps(self.head(), separators=(",", ":"))
        tail = json.dumps(
            {
                "offset": offset,
                "limit": limit,
                "next_offset": self.next_offset,
                "truncated": self.truncated,
                **extra,
            },
            separators=(",", ":"),
        )
        return f'{head[:-1]},"items":[{",".join(self.items)}],{tail[1:]}'


def summary(batch: Batch, counts: dict[str, int]) -> dict[str, Any]:
    """A batch without its items: id, plugin, owner, times, status, counts."""
    return {
        "id": batch.id,
        "plugin": batch.plugin,
        "owner": batch.owner,
        "created_at": batch.created_at,
        "finished_at": batch.finished_at,
        "status": batch_status(batch, counts),
        "total": len(batch.job_ids),
        "counts": counts,
    }


def item_document(index: int, job_id: str, found: RawJob | None) -> str:
    """An item's public parts: index, job id, status, times, result, error
    (as stored, unparsed). An item pruned since has status null."""
    if found is None:
        return json.dumps(
            {"index": index, "job_id": job_id, "status": None, "result": None, "error": None},
            separators=(",", ":"),
        )
    job, result, error = found
    head = json.dumps(
        {
            "index": index,
            "job_id": job_id,
            "status": job.status.value,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
        },
        separators=(",", ":"),
    )
    return f'{head[:-1]},"result":{result or "null"},"error":{error or "null"}}}'


def find_batch(rows: BatchRows, batch_id: str, owner: str | None) -> Batch:
    batch = rows.batch(batch_id)
    if batch is None or (owner is not None and batch.owner != owner):
        raise _not_found(batch_id)
    return batch


def read_page(
    store: object, batch_id: str, owner: str | None, limit: int, offset: int, max_bytes: int
) -> BatchPage:
    """`BatchService.get` of the batches of `store`."""
    with rows_of(store) as rows:
        batch = find_batch(rows, batch_id, owner)
        counts = rows.counts(batch_id)
        items: list[str] = []
        used, truncated = 0, False
        for index in range(offset, min(offset + limit, len(batch.job_ids))):
            job_id = batch.job_ids[index]
            text = item_document(index, job_id, rows.jobs.raw(job_id))
            if items and used + len(text) + 1 > max_bytes:
                truncated = True
                break
            items.append(text)
            used += len(text) + 1
    end = offset + len(items)
    return BatchPage(batch, counts, items, end if end < len(batch.job_ids) else None, truncated)


def batch_body(store: object, max_bytes: int) -> Callable[[str], str | None]:
    """The body of a batch's callback: its view as GET /v1/batches/{id}
    gives it, with as many items as `max_bytes` of them hold (the first
    page); `items_truncated` says whether some were left out, and
    `items_next` then where the rest begin. None once the batch is gone."""

    def render(batch_id: str) -> str | None:
        try:
            page = read_page(store, batch_id, None, MAX_PAGE_ITEMS, 0, max_bytes)
        except ServiceError as exc:
            if exc.reason != "not_found":
                raise
            return None
        more = page.next_offset is not None
        extra: dict[str, Any] = {"items_truncated": more}
        if more:
            extra["items_next"] = f"/v1/batches/{batch_id}?offset={page.next_offset}"
        return page.view(MAX_PAGE_ITEMS, 0, **extra)

    return render


__all__ = [
    "MAX_PAGE_ITEMS",
    "BatchPage",
    "batch_body",
    "find_batch",
    "item_document",
    "read_page",
    "summary",
]
