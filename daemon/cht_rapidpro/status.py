"""Delivery status: RapidPro message statuses become CHT task states.

The follower of RapidPro's message log (`messagelog.py`) reads statuses; this module writes
them. Tasks are found by their `gateway_ref` in CouchDB, one request per page of RapidPro's log
that brought news: CHT's `medic-sms/messages_by_gateway_ref` view (with the documents), or,
without it, the documents whose ids the in-memory index kept. Each status goes through CHT's
`setTaskState` (wired → forwarded-by-gateway, sent → sent, delivered/read → delivered,
errored → received-by-gateway with details `Errored`, failed → failed), and only onto a task
still in flight with the same `gateway_ref` (a task cleared, resent or muted meanwhile is left
alone). Conflicts are re-read and re-applied a bounded number of times.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .cht.outgoing import MalformedTaskError, iter_tasks, task_at
from .cht.phone import normalize
from .cht.state import IN_FLIGHT_STATES, STATUS_MAP, State, set_task_state
from .chtconfig import ChtConfig
from .couch.client import BulkWriter, CouchClient, JsonDict, clone
from .logs import get_logger
from .metrics import Metrics
from .mirror import mirror_id
from .rapidpro.models import Message
from .tracking import MIRROR_BASE, TrackedIndex, index_key, number_tail

MAX_WRITE_ROUNDS = 5
REF_VIEW = ("medic-sms", "messages_by_gateway_ref")


def view_keys(key: int, host: str) -> list[Any]:
    """How a key may be stored as `gateway_ref` (CHT stores RapidPro's int; hand-written
    documents may hold a string), i.e. the keys to ask CHT's view for."""
    if key >= MIRROR_BASE:
        return [mirror_id(host, key - MIRROR_BASE)]
    return [key, str(key)]


class StatusWriter:
    """Writes RapidPro statuses onto the CHT tasks they belong to."""

    def __init__(
        self,
        *,
        couch: CouchClient,
        writer: BulkWriter,
        cht: ChtConfig,
        index: TrackedIndex,
        metrics: Metrics,
        on_accepted: Callable[[str], None] = lambda _doc_id: None,
        on_written: Callable[[str, str | None], None] = lambda _doc_id, _rev: None,
    ) -> None:
        self._on_written = on_written  # our own revisions: the feed need not read them back
        self._couch = couch
        self._writer = writer
        self._cht = cht
        self._index = index
        self._metrics = metrics
        self._on_accepted = on_accepted  # a write without quorum: merge what it may leave
        self._log = get_logger(component="poller")
        self.ref_view = False  # CHT's messages_by_gateway_ref exists (set by the follower)

    async def docs_for(self, keys: Iterable[int], host: str) -> dict[str, JsonDict]:
        """The documents holding tasks with these keys (one CouchDB request)."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        if self.ref_view:
            view = [k for key in wanted for k in view_keys(key, host)]
            rows = await self._couch.view(*REF_VIEW, keys=view, include_docs=True)
            return {
                str(row["id"]): row["doc"]
                for row in rows
                if isinstance(row.get("doc"), dict) and isinstance(row.get("id"), str)
            }
        ids = {doc_id for key in wanted if (doc_id := self._index.doc_id(key)) is not None}
        return await self._couch.get_many(sorted(ids))

    async def write(
        self, updates: Mapping[int, Sequence[Message]], *, host: str, now: float
    ) -> tuple[int, int]:
        """Apply the newest status of each key's row(s); returns (tasks updated, conflicts)."""
        updated = conflicts = 0
        docs = await self.docs_for(updates, host)
        found = {key for doc in docs.values() for key in _in_flight_keys(doc) if key in updates}
        for key in updates:
            if key not in found:
                self._index.finish(key, now)  # no task in flight carries it any more
        pending = {
            doc_id: doc for doc_id, doc in docs.items() if _in_flight_keys(doc) & set(updates)
        }
        for _ in range(MAX_WRITE_ROUNDS):
            if not pending:
                break
            writes: list[tuple[JsonDict, int]] = []
            for doc in pending.values():
                changed = clone(doc)
                count = self._apply(changed, updates)
                if count:
                    writes.append((changed, count))
                else:
                    self._index.update_doc(doc, now)
            results = await asyncio.gather(
                *(self._writer.write(doc, lazy=True) for doc, _ in writes)
            )
            retry: list[str] = []
            for (doc, count), result in zip(writes, results, strict=True):
                if result.ok:
                    doc["_rev"] = result.rev
                    self._on_written(str(doc["_id"]), result.rev)
                    if result.accepted:
                        self._on_accepted(str(doc["_id"]))
                    updated += count
                    self._count_states(doc, updates)
                    self._index.update_doc(doc, now)
                elif result.conflict:
                    conflicts += 1
                    self._metrics.write_conflicts.inc()
                    retry.append(str(doc["_id"]))
                else:
                    self._log.error("status_write_refused", doc_id=doc["_id"], error=result.error)
            pending = await self._couch.get_many(retry) if retry else {}
        if pending:
            self._log.warning("status_write_gave_up", docs=len(pending))
        return updated, conflicts

    def _apply(self, doc: JsonDict, updates: Mapping[int, Sequence[Message]]) -> int:
        """setTaskState for each in-flight task a row speaks for; returns tasks changed."""
        changed = 0
        settings = self._cht.app_settings
        try:
            tasks = list(iter_tasks(doc))
        except MalformedTaskError:
            return 0
        for ref, _ in tasks:
            task = task_at(doc, ref)
            key = index_key(task.get("gateway_ref")) if task is not None else None
            rows = updates.get(key) if key is not None else None
            if task is None or not rows or task.get("state") not in IN_FLIGHT_STATES:
                continue
            row = _row_for(task, rows, settings)
            mapped = STATUS_MAP.get(row.status or "") if row is not None else None
            if mapped is None:
                continue
            state, details = mapped
            if set_task_state(task, state, details, task.get("gateway_ref")):
                changed += 1
        return changed

    def _count_states(self, doc: JsonDict, updates: Mapping[int, Sequence[Message]]) -> None:
        try:
            tasks = list(iter_tasks(doc))
        except MalformedTaskError:
            return
        for _, task in tasks:
            key = index_key(task.get("gateway_ref"))
            if key is None or key not in updates:
                continue
            state = task.get("state")
            if isinstance(state, str):
                self._metrics.state_updates.labels(state).inc()
            if state == State.DELIVERED:
                self._metrics.messages_delivered.inc()
            elif state == State.FAILED:
                self._metrics.messages_failed.inc()


def _in_flight_keys(doc: JsonDict) -> set[int]:
    keys = set()
    try:
        for _, task in iter_tasks(doc):
            key = index_key(task.get("gateway_ref"))
            if key is not None and task.get("state") in IN_FLIGHT_STATES:
                keys.add(key)
    except MalformedTaskError:
        pass
    return keys


def _row_for(
    task: Mapping[str, Any], rows: Sequence[Message], settings: Mapping[str, Any]
) -> Message | None:
    """The row for this task: the only one, or the one sent to the task's number (several
    of a broadcast's recipients may be ours)."""
    if len(rows) == 1:
        return rows[0]
    messages = task.get("messages")
    numbers = {
        number_tail(normalize(settings, m.get("to")) or m.get("to"))
        for m in (messages if isinstance(messages, list) else [])
        if isinstance(m, dict)
    }
    for row in rows:
        if number_tail(row.urn) in numbers:
            return row
    return None
