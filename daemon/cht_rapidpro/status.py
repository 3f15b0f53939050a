"""Delivery-status polling: RapidPro message statuses become CHT task states.

CHT polls one request per message per minute (spec §8.6). We keep an index of in-flight
tasks (fed by the changes feed and the start-up sweep) and read RapidPro's message list by
time window instead: one request returns 250 messages, matched back to our tasks by broadcast
id (and URN when a broadcast has several recipients). Scans are newest first and follow the
opaque `next` cursor.

Bounding the window (spec rapidpro-api §5.3): `sent` is final after a grace period (channels
without delivery reports), anything is dropped after `max_tracking_s`, and messages older
than an hour are rescanned only every `deep_interval` so that one straggler does not widen
every round.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .cht.outgoing import InFlightTask, MalformedTaskError, in_flight_tasks, task_at
from .cht.phone import normalize
from .cht.state import FINAL_STATUSES, IN_FLIGHT_STATES, STATUS_MAP, State, set_task_state
from .chtconfig import ChtConfig
from .config import Settings
from .couch.client import BulkWriter, CouchClient, JsonDict, clone
from .errors import AuthError, GatewayError, RetryableError, UpstreamConfigError
from .logs import get_logger
from .metrics import Metrics
from .rapidpro.client import RapidProClient
from .rapidpro.models import Message
from .retry import sleep_or_wake

#: Messages younger than this are scanned every round; older ones every deep interval.
YOUNG_S = 3600.0
MAX_WRITE_ROUNDS = 5


def ref_key(gateway_ref: Any) -> str:
    """Broadcast ids compare as text: CHT stores what RapidPro sent (an int), but docs
    written by hand or by tests may carry strings."""
    return str(gateway_ref)


@dataclass(slots=True)
class Tracked:
    task: InFlightTask
    urns: frozenset[str]

    @property
    def key(self) -> str:
        return self.task.ref.key


class InFlightIndex:
    """Tasks whose RapidPro status may still change, by task, document and broadcast."""

    def __init__(self) -> None:
        self.by_task: dict[str, Tracked] = {}
        self._by_doc: dict[str, set[str]] = {}
        self._by_ref: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self.by_task)

    def update_doc(self, doc: JsonDict, app_settings: dict[str, Any]) -> None:
        """Replace what we track for this document with what its current revision says."""
        doc_id = str(doc.get("_id"))
        self.remove_doc(doc_id)
        if doc.get("_deleted"):
            return
        try:
            found = in_flight_tasks(doc)
        except MalformedTaskError:
            return  # the sender already counted and logged it
        for task in found:
            urns = frozenset(f"tel:{normalize(app_settings, m.to) or m.to}" for m in task.messages)
            self._add(Tracked(task, urns))

    def _add(self, tracked: Tracked) -> None:
        key = tracked.key
        self.by_task[key] = tracked
        self._by_doc.setdefault(tracked.task.ref.doc_id, set()).add(key)
        self._by_ref.setdefault(ref_key(tracked.task.gateway_ref), set()).add(key)

    def remove(self, key: str) -> None:
        tracked = self.by_task.pop(key, None)
        if tracked is None:
            return
        for index, name in (
            (self._by_doc, tracked.task.ref.doc_id),
            (self._by_ref, ref_key(tracked.task.gateway_ref)),
        ):
            keys = index.get(name)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index[name]

    def remove_doc(self, doc_id: str) -> None:
        for key in list(self._by_doc.get(doc_id, ())):
            self.remove(key)

    def for_broadcast(self, gateway_ref: Any) -> list[Tracked]:
        return [self.by_task[k] for k in self._by_ref.get(ref_key(gateway_ref), ())]

    def has_ref(self, gateway_ref: Any) -> bool:
        return ref_key(gateway_ref) in self._by_ref


@dataclass(frozen=True, slots=True)
class Update:
    tracked: Tracked
    status: str


@dataclass(slots=True)
class RoundReport:
    """What one poll round did (the canonical `status_poll_completed` line)."""

    tracked: int = 0
    window_s: float = 0.0
    deep: bool = False
    requests: int = 0
    rows: int = 0
    matched: int = 0
    updated: int = 0
    dropped: int = 0
    conflicts: int = 0
    stopped: str | None = None


class StatusPoller:
    """Polls RapidPro for the status of in-flight messages and writes the new states."""

    def __init__(
        self,
        *,
        couch: CouchClient,
        writer: BulkWriter,
        rapidpro: RapidProClient,
        cht: ChtConfig,
        settings: Settings,
        index: InFlightIndex,
        metrics: Metrics,
        on_accepted: Callable[[str], None] = lambda _doc_id: None,
        on_written: Callable[[str, str | None], None] = lambda _doc_id, _rev: None,
    ) -> None:
        self._on_written = on_written  # our own revisions: the feed need not read them back
        self._on_accepted = on_accepted  # a write without quorum: merge what it may leave
        self._couch = couch
        self._writer = writer
        self._rapidpro = rapidpro
        self._cht = cht
        self._settings = settings
        self.index = index
        self._metrics = metrics
        self._log = get_logger(component="poller")
        self._deep_interval = max(600.0, 10 * settings.poll_interval_s)
        self._next_deep = 0.0
        self.last_round: RoundReport | None = None

    async def run(self, stop: Any) -> None:
        """Poll every `poll_interval_s` until `stop` (an asyncio.Event) is set."""
        while not stop.is_set():
            try:
                await self.run_once()
            except GatewayError as exc:
                self._log.warning("status_poll_retrying", error=str(exc))
            await sleep_or_wake(stop, self._settings.poll_interval_s)

    def _expire(self, now: datetime, report: RoundReport) -> None:
        """Stop tracking what RapidPro will not change any more (window bounds)."""
        grace = timedelta(seconds=self._settings.sent_grace_s)
        limit = timedelta(seconds=self._settings.max_tracking_s)
        for key, tracked in list(self.index.by_task.items()):
            sent_at = tracked.task.sent_at
            if sent_at is None:
                continue
            age = now - sent_at
            if age > limit or (tracked.task.state == State.SENT and age > grace):
                self.index.remove(key)
                report.dropped += 1

    async def run_once(self) -> RoundReport:
        """One poll round; returns its report (also logged)."""
        report = RoundReport()
        started = time.monotonic()
        gate = self._cht.gate
        if not gate.open or gate.target is None:
            return report
        now = datetime.now(UTC)
        self._expire(now, report)
        self._metrics.in_flight.set(len(self.index))
        report.tracked = len(self.index)
        if not self.index.by_task:
            self._metrics.status_polls.inc()  # a round, with nothing to ask RapidPro
            return report
        stamps = [t.task.sent_at or now for t in self.index.by_task.values()]
        young = [s for s in stamps if (now - s).total_seconds() < YOUNG_S]
        deep = not young or time.monotonic() >= self._next_deep
        report.deep = deep
        oldest = min(stamps if deep else young)
        after = oldest - timedelta(seconds=self._settings.clock_skew_s)
        report.window_s = round((now - after).total_seconds(), 1)

        # Newest first: the first row seen for a task is its current status.
        seen: set[str] = set()
        updates: list[Update] = []
        try:
            async for page in self._rapidpro.messages(gate.target, after=after):
                report.requests += 1
                report.rows += len(page)
                updates += self._match(page, seen)
        except RetryableError as exc:
            report.stopped = "throttled" if exc.retry_after is not None else "unavailable"
            self._log.warning(
                "status_poll_interrupted",
                reason=report.stopped,
                error=str(exc),
                requests=report.requests,
            )
        except (AuthError, UpstreamConfigError) as exc:
            report.stopped = "refused"
            self._log.error("status_poll_refused", error=str(exc))
        else:
            if deep:
                self._next_deep = time.monotonic() + self._deep_interval
        report.matched = len(updates)
        if updates:
            await self._write(updates, report)
        self._metrics.status_polls.inc()
        self._metrics.in_flight.set(len(self.index))
        self.last_round = report
        self._log.info(
            "status_poll_completed",
            tracked=report.tracked,
            window_s=report.window_s,
            deep=report.deep,
            requests=report.requests,
            rows=report.rows,
            matched=report.matched,
            updated=report.updated,
            dropped=report.dropped,
            conflicts=report.conflicts,
            stopped=report.stopped,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return report

    def _match(self, page: Iterable[Message], seen: set[str]) -> list[Update]:
        updates = []
        for row in page:
            if row.direction == "in" or row.broadcast is None or row.status is None:
                continue
            candidates = self.index.for_broadcast(row.broadcast)
            if len(candidates) > 1:
                # Several of our tasks share this broadcast: tell them apart by URN.
                candidates = [t for t in candidates if row.urn in t.urns]
            for tracked in candidates:
                if tracked.key in seen:
                    continue
                seen.add(tracked.key)
                mapped = STATUS_MAP.get(row.status)
                if mapped == (tracked.task.state, tracked.task.details):
                    continue  # no news: nothing to read or write
                if mapped is not None:
                    updates.append(Update(tracked, row.status))
                else:
                    self._log.debug("status_unknown", rapidpro_status=row.status)
        return updates

    async def _write(self, updates: list[Update], report: RoundReport) -> None:
        by_doc: dict[str, list[Update]] = {}
        for update in updates:
            by_doc.setdefault(update.tracked.task.ref.doc_id, []).append(update)
        pending = dict(by_doc)
        for _ in range(MAX_WRITE_ROUNDS):
            if not pending:
                return
            docs = await self._couch.get_many(list(pending))
            writes: list[tuple[JsonDict, list[Update]]] = []
            for doc_id, doc_updates in pending.items():
                doc = docs.get(doc_id)
                if doc is None:
                    self.index.remove_doc(doc_id)
                    continue
                changed = clone(doc)
                applied = [u for u in doc_updates if self._apply(changed, u)]
                if applied:
                    writes.append((changed, applied))
                else:
                    self.index.update_doc(doc, self._cht.app_settings)
            # Concurrent writes share one _bulk_docs request (group commit).
            results = await asyncio.gather(*(self._writer.write(doc) for doc, _ in writes))
            pending = {}
            for (doc, applied), result in zip(writes, results, strict=True):
                if result.ok:
                    doc["_rev"] = result.rev
                    self._on_written(str(doc["_id"]), result.rev)
                    if result.accepted:
                        self._on_accepted(str(doc["_id"]))
                    report.updated += len(applied)
                    for update in applied:
                        state, _ = STATUS_MAP[update.status]
                        self._metrics.state_updates.labels(state.value).inc()
                        if state == State.DELIVERED:
                            self._metrics.messages_delivered.inc()
                        elif state == State.FAILED:
                            self._metrics.messages_failed.inc()
                    self.index.update_doc(doc, self._cht.app_settings)
                elif result.conflict:
                    report.conflicts += 1
                    self._metrics.write_conflicts.inc()
                    pending[str(doc["_id"])] = by_doc[str(doc["_id"])]
                else:
                    self._log.error("status_write_refused", doc_id=doc["_id"], error=result.error)
        if pending:
            self._log.warning("status_write_gave_up", docs=len(pending))

    def _apply(self, doc: JsonDict, update: Update) -> bool:
        """setTaskState for a polled status, if the task is still the one we polled for."""
        task = task_at(doc, update.tracked.task.ref)
        ref = update.tracked.task.gateway_ref
        if (
            task is None
            or ref_key(task.get("gateway_ref")) != ref_key(ref)
            or task.get("state") not in IN_FLIGHT_STATES
        ):
            return False
        state, details = STATUS_MAP[update.status]
        changed = set_task_state(task, state, details, task.get("gateway_ref"))
        if update.status in FINAL_STATUSES:
            self.index.remove(update.tracked.key)
        return changed
