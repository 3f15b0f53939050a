"""Outgoing sends: a pending task is claimed, sent as a RapidPro broadcast, and written back.

The order per document, and why:
1. **Claim** (`claims.py`, where the exactly-once argument is written down): the task goes
   to `forwarded-to-gateway` with details naming this process, and the claim must be
   *held* (committed with quorum, confirmed against every branch of the document) before
   anything is posted. Claims run at most a few send slots ahead of sending, so a crash
   strands little.
2. **Reconcile** (only when an earlier attempt may have reached RapidPro: a takeover, a
   timeout, a 5xx): look for the broadcast in RapidPro before sending again. RapidPro has no
   idempotency key; this lookup is ours.
3. **Send**: `POST /api/v2/broadcasts.json`, within the client-side budget, each POST within
   a quarter of the claim's lease (renewed first when older).
4. **Write back** with CHT's `setTaskState`: `received-by-gateway` + `gateway_ref`, or `failed`
   with RapidPro's reason on a 400, while the task is still one we claimed in this attempt
   and still sendable (so a `cleared`/`muted` set meanwhile is never overwritten). On a
   cluster a write-back answered `accepted` is checked the way a claim is, and the branches
   it may have left are merged (`conflicts.py`).

Transient failures never mark a message failed: the job waits (global pause for RapidPro
outages, per-message backoff for a message that keeps failing) and the claim is renewed
before it could look abandoned to a replica.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from .cht.outgoing import (
    MalformedTaskError,
    OutgoingMessage,
    SendableTask,
    TaskRef,
    claim_entries,
    same_messages,
    sendable_tasks,
    task_at,
)
from .cht.phone import Refused, mask, rapidpro_urn
from .cht.state import SENDABLE_STATES, State, parse_iso, set_task_state
from .chtconfig import ChtConfig
from .claims import ClaimedTask, Claims, Hold, Identity
from .config import Settings
from .conflicts import ConflictResolver
from .couch.client import BulkWriter, CouchClient, DocReader, JsonDict, LeafReader, clone
from .errors import (
    AuthError,
    GatewayError,
    PermanentError,
    RetryableError,
    UpstreamConfigError,
)
from .logs import get_logger
from .metrics import Metrics
from .rapidpro.client import RapidProClient
from .rapidpro.models import Broadcast, Target
from .rapidpro.parts import TooManyParts, split, text_limit
from .reconcile import Reconciler
from .replicas import Presence
from .retry import Backoff, Outage, sleep_or_wake

Release = Callable[[], None]
#: How many rounds of conflict → re-read → re-apply a write gets before we let it go.
MAX_WRITE_ROUNDS = 8
#: Claims held but not yet posted, per send slot (claims no further ahead than sending; a
#: crash strands at most this many per slot, and they wait SEND_TIMEOUT after the restart).
CLAIMS_PER_SLOT = 16
#: Looks at an `accepted` write-back before it is written again (it may sit on one copy).
VERIFY_DELAYS = (0.1, 0.5, 2.0)
#: Pause after RapidPro refuses our token or URL, unless the configuration changes first.
CONFIG_PAUSE_S = 60.0
#: Replicas share the work without a coordinator: each document has a preferred replica
#: (rendezvous hashing over the live replicas, see `replicas.py`); the others leave it to
#: that one for HANDOFF_S before claiming it themselves. A lone daemon never waits.
HANDOFF_S = 1.0
#: How long a replica leaves a conflicted document to its preferred replica.
RESOLVE_HANDOFF_S = 2.0
#: When to look again at a document whose write kept conflicting.
RETRY_GAVE_UP = timedelta(seconds=30)
#: How many documents' last own write to remember (to skip our own revisions on the feed).
WRITTEN_MEMORY = 20_000


def escape_text(text: str) -> str:
    """RapidPro evaluates broadcast text as a template: `@@` is a literal `@`."""
    return text.replace("@", "@@")


@dataclass(frozen=True, slots=True)
class Accepted:
    broadcast: Broadcast  # the first part's, for a message sent in parts
    adopted: bool  # found by reconciliation, not posted by this attempt
    parts: tuple[Any, ...] = ()  # every part's broadcast id, in order (a split message)


@dataclass(frozen=True, slots=True)
class Rejected:
    summary: str
    parts: tuple[Any, ...] = ()  # broadcasts of the parts sent before one was refused


@dataclass(slots=True)
class MessageJob:
    message: OutgoingMessage
    urn: str
    text: str  # escaped, exactly as posted
    uncertain: bool  # an earlier attempt may have created the broadcast: reconcile first
    # Monotonic time before which an earlier, abandoned POST may still be creating its
    # broadcast at RapidPro: looking it up sooner could miss it and send it twice.
    settle_until: float = 0.0
    result: Accepted | Rejected | None = None
    attempts: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    # Too long for RapidPro: sent as these numbered parts, in order (`rapidpro/parts.py`).
    parts: list[MessageJob] | None = None
    is_part: bool = False  # one of another job's parts (never split again)


@dataclass(slots=True)
class TaskJob:
    claim: ClaimedTask
    messages: list[MessageJob]

    @property
    def ref(self) -> TaskRef:
        return self.claim.ref


@dataclass(slots=True)
class DocJob:
    hold: Hold  # our held claims (and our latest revision of the document)
    tasks: list[TaskJob]
    releases: list[Release]
    started: float = field(default_factory=time.monotonic)

    @property
    def doc(self) -> JsonDict:
        return self.hold.doc


@dataclass(slots=True)
class _Entry:
    doc: JsonDict
    releases: list[Release]
    due: float = 0.0  # when its oldest sendable message fell due (epoch seconds)
    ready_at: float = 0.0  # monotonic: not before (another replica's turn first)
    version: int = 0
    mine: bool = True  # this replica is the one preferred to send it


class _Backlog:
    """Documents waiting for a send job, the oldest-due first.

    Documents another live replica is preferred for (`replicas.py`) wait HANDOFF_S, and
    after that only come when this replica has nothing of its own to do, the newest first:
    under a backlog each replica works through its own share oldest first, and one that is
    done helps another from the other end of that replica's share, where the two meet last
    (work stealing), rather than racing it for the same documents.
    """

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        self._heaps: tuple[list[tuple[float, int, str, int]], ...] = ([], [])  # mine, theirs
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self.entries

    def put(self, doc_id: str, entry: _Entry, *, mine: bool) -> None:
        entry.version += 1
        entry.mine = mine
        entry.ready_at = 0.0 if mine else time.monotonic() + HANDOFF_S
        self.entries[doc_id] = entry
        key = entry.due if mine else -entry.due
        heapq.heappush(
            self._heaps[0 if mine else 1], (key, next(self._order), doc_id, entry.version)
        )

    def pop(self, doc_id: str) -> _Entry | None:
        return self.entries.pop(doc_id, None)  # its heap item is skipped when reached

    def next_ready(self, *, help_others: bool = True) -> tuple[str, _Entry] | float | None:
        """The next document to start, or seconds until one is ready, or None if empty.
        Another replica's documents only with `help_others` (this one has nothing waiting)."""
        wait: float | None = None
        now = time.monotonic()
        for heap in self._heaps if help_others else self._heaps[:1]:
            while heap:
                _, _, doc_id, version = heap[0]
                entry = self.entries.get(doc_id)
                if entry is None or entry.version != version:
                    heapq.heappop(heap)  # stale: popped or put again since
                    continue
                if entry.ready_at <= now:
                    heapq.heappop(heap)
                    del self.entries[doc_id]
                    return doc_id, entry
                wait = entry.ready_at - now if wait is None else min(wait, entry.ready_at - now)
                break
        return wait

    def clear(self) -> list[_Entry]:
        entries = list(self.entries.values())
        self.entries.clear()
        for heap in self._heaps:
            heap.clear()
        return entries


def _due(doc: JsonDict, sendable: list[SendableTask]) -> float:
    """When the document's oldest sendable message fell due, as CHT's `messages_by_state`
    orders them (`due`, else `timestamp`, else `reported_date`; epoch seconds)."""
    reported = doc.get("reported_date")
    fallback = reported / 1000 if isinstance(reported, int | float) else 0.0
    found = []
    for task in sendable:
        item = task_at(doc, task.ref) or {}
        value = item.get("due") or item.get("timestamp")
        stamp = parse_iso(value) if isinstance(value, str) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            found.append(value / 1000)
        elif stamp is not None:
            found.append(stamp.timestamp())
        else:
            found.append(fallback)
    return min(found, default=fallback)


class _Stopping(Exception):
    """Raised inside a job when the daemon is shutting down."""


class _TaskLost(Exception):
    """Our claim on a task was replaced: its messages must not be posted by us."""


class _Abandon(Exception):
    """The job cannot go on now (sending disabled, claim lost); its claims stay."""


class OutgoingSender:
    """Sends every sendable message offered to it; one job per document."""

    def __init__(
        self,
        *,
        couch: CouchClient,
        writer: BulkWriter,
        rapidpro: RapidProClient,
        cht: ChtConfig,
        settings: Settings,
        identity: Identity,
        metrics: Metrics,
        presence: Presence,
        is_taken: Callable[[Any], bool] = lambda _ref: False,
        max_active: int = 256,
        resolver: ConflictResolver | None = None,
        on_doc: Callable[[JsonDict], None] = lambda _doc: None,
    ) -> None:
        # Our own writes are not read back from the feed (`is_own_revision`): whoever
        # tracks documents (the in-flight index) learns of them here.
        self._on_doc = on_doc
        self._couch = couch
        self._writer = writer
        self._rapidpro = rapidpro
        self._cht = cht
        self._settings = settings
        self.identity = identity
        self._metrics = metrics
        self._presence = presence
        self._written: OrderedDict[str, tuple[str, ...]] = OrderedDict()  # our latest revs
        self._resolve_after: set[str] = set()  # conflicted while a job had them
        self._max_active = max_active
        self._log = get_logger(component="sender")
        self._reconciler = Reconciler(
            rapidpro, skew=timedelta(seconds=settings.clock_skew_s), is_taken=is_taken
        )
        self._queue = _Backlog()
        self._active: dict[str, asyncio.Task[None]] = {}
        self._deferred: dict[str, _Entry] = {}
        self._rechecks: dict[str, asyncio.TimerHandle] = {}
        self._wake = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._send_slots = asyncio.Semaphore(settings.send_concurrency)
        # RapidPro and CouchDB fail independently: one shared pause for each.
        self._outage = Outage(
            Backoff(initial=settings.retry_initial_s, maximum=settings.retry_max_s)
        )
        self._couch_outage = Outage(
            Backoff(initial=settings.retry_initial_s, maximum=settings.retry_max_s)
        )
        self._paused_until = 0.0  # set by a refused configuration (401/403/404)
        self._pause_target: Target | None = None
        self._pause_reason = ""
        self._claim_ttl = timedelta(seconds=settings.claim_ttl_s)
        # A job holds a slot from its claim until its last POST: claims never run more
        # than CLAIMS_PER_SLOT x SEND_CONCURRENCY documents ahead of sending.
        self._claim_slots = asyncio.Semaphore(settings.send_concurrency * CLAIMS_PER_SLOT)
        self._claim_waiters = 0  # jobs waiting for a claim slot
        self.resolver = resolver or ConflictResolver(
            couch, metrics, on_written=self._remember_write, on_doc=on_doc
        )
        # Re-reads before claiming (another replica's document) and after a conflict come
        # in bursts on a cluster: they share requests.
        self._docs = DocReader(couch)
        self.claims = Claims(
            couch=couch,
            writer=writer,
            resolver=self.resolver,
            identity=identity,
            settings=settings,
            metrics=metrics,
            pause=self._sleep,
            couch_outage=self._couch_outage,
            on_written=self._remember_write,
            leaves=LeafReader(couch).leaves,
            reread=self._docs.get,
        )

    # -- intake ---------------------------------------------------------------------------

    def offer(self, doc: JsonDict, release: Release | None = None) -> bool:
        """Queue a document for sending if it has sendable tasks.

        `release` is called once the document is handled (written back, or parked after a
        transient failure); the changes follower uses it to advance its checkpoint.

        Returns:
            True if the document was queued (the caller must then wait for `release`).
        """
        doc_id = doc.get("_id")
        if not isinstance(doc_id, str):
            return False

        def malformed(ref: TaskRef, problem: str) -> None:
            self._metrics.bad_documents.inc()
            self._log.warning("task_skipped", doc_id=doc_id, task=ref.key, problem=problem)

        if self.is_own_revision(doc_id, doc.get("_rev")) and not ConflictResolver.conflicted(doc):
            return False  # a revision before our own last write: nothing new in it
        # A newer revision is here: a look scheduled for later (a peer's claim expiring)
        # is planned again from it, or is not needed any more.
        recheck = self._rechecks.pop(doc_id, None)
        if recheck is not None:
            recheck.cancel()
        try:
            sendable = sendable_tasks(doc, malformed)
            self._note_peers(sendable)
        except MalformedTaskError as exc:
            self._metrics.bad_documents.inc()
            self._log.warning("document_skipped", doc_id=doc_id, problem=str(exc))
            sendable = []
        if not sendable:
            # Nothing to send any more (another replica sent it): not worth a job.
            gone = self._queue.pop(doc_id)
            if gone is not None:
                _release_all(gone.releases)
                self._metrics.send_queue.set(len(self._queue))
                self._update_idle()
            return False
        releases = [release] if release else []
        if self._stopping:
            return True  # never released: the checkpoint stays before this document
        if doc_id in self._active:
            entry = self._deferred.setdefault(doc_id, _Entry(doc, []))
            entry.doc = doc
            entry.releases += releases
        elif (queued := self._queue.entries.get(doc_id)) is not None:
            queued.doc = doc
            queued.releases += releases
        else:
            self._queue.put(
                doc_id,
                _Entry(doc, releases, due=_due(doc, sendable)),
                mine=self._preferred(doc_id),
            )
            self._idle.clear()
            self._wake.set()
        self._metrics.send_queue.set(len(self._queue))
        return True

    def resolve_soon(self, doc_id: str) -> None:
        """Merge a document's conflicting branches (seen on the feed, or left by an
        `accepted` write) unless a job working on it does so itself. Replicas other than
        the document's preferred one wait a moment: most often it has done it by then."""
        if self._stopping:
            return
        if doc_id in self._active or doc_id in self._queue:
            self._resolve_after.add(doc_id)  # once the job is done with it
            return
        delay = 0.0 if self._preferred(doc_id) else RESOLVE_HANDOFF_S
        self._log.debug("conflict_seen", doc_id=doc_id, delay_s=delay)
        self._spawn(self._resolve_later(doc_id, delay), f"resolve:{doc_id}")

    def remember_write(self, doc_id: str, rev: str | None) -> None:
        """Another writer of this process (the poller) wrote `rev`: skip it on the feed too."""
        self._remember_write(doc_id, rev)

    def _remember_write(self, doc_id: str, rev: str | None) -> None:
        if rev is None:
            return
        self._written[doc_id] = (*self._written.get(doc_id, ())[-3:], rev)
        self._written.move_to_end(doc_id)
        if len(self._written) > WRITTEN_MEMORY:
            self._written.popitem(last=False)

    def is_own_revision(self, doc_id: str, rev: Any) -> bool:
        """Whether `rev` is one of the revisions this process wrote itself lately.

        The feed shows our own writes back to us (a claim, then its write-back): acting on
        them would only cost a conflicting write and a re-read, and whoever else reads the
        feed learnt of them when they were written (the tracked index, the backlog). Revisions
        are matched exactly: on a cluster another writer's revision can be of the same
        generation as ours (a sibling branch), and it must not be skipped.
        """
        return isinstance(rev, str) and rev in self._written.get(doc_id, ())

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._active)

    async def idle(self) -> None:
        """Wait until nothing is queued or being sent (tests and benchmarks)."""
        await self._idle.wait()

    # -- the pump -------------------------------------------------------------------------

    async def run(self) -> None:
        """Start a job for each queued document, up to `max_active` at once."""
        while not self._stopping:
            gate = self._cht.gate
            if not gate.open:
                self._drop_queue()
                await self._cht.wait_changed(within=5.0)
                continue
            if len(self._active) >= self._max_active or not self._queue:
                self._wake.clear()
                await sleep_or_wake(self._wake, 1.0)
                continue
            # Don't claim far beyond what the budget lets us send soon: a claim that waits
            # too long goes stale and must be renewed.
            remaining = self._rapidpro.budget.remaining("broadcasts")
            if remaining is not None and remaining <= len(self._active):
                self._wake.clear()
                await sleep_or_wake(
                    self._wake, max(0.05, self._rapidpro.budget.wait_time("broadcasts"))
                )
                continue
            # Help other replicas only once every job of ours has its claim slot.
            ready = self._queue.next_ready(help_others=self._claim_waiters == 0)
            if not isinstance(ready, tuple):
                self._wake.clear()
                await sleep_or_wake(self._wake, 1.0 if ready is None else min(ready, 1.0))
                continue
            doc_id, entry = ready
            self._metrics.send_queue.set(len(self._queue))
            task = asyncio.create_task(self._job(entry), name=f"send:{doc_id}")
            self._active[doc_id] = task
            task.add_done_callback(functools.partial(self._job_done, doc_id))

    def _drop_queue(self) -> None:
        """Sending is off: let queued documents go (a sweep finds them when it comes back on)."""
        if not self._queue:
            return
        for entry in self._queue.clear():
            _release_all(entry.releases)
        self._metrics.send_queue.set(0)
        self._update_idle()

    def _job_done(self, doc_id: str, task: asyncio.Task[None]) -> None:
        self._active.pop(doc_id, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("send_job_crashed", doc_id=doc_id, exc_info=exc)
        deferred = self._deferred.pop(doc_id, None)
        if deferred is not None and not self._stopping:
            # The document changed while we worked on it: look at the newer revision.
            if not self.offer(deferred.doc, None):
                _release_all(deferred.releases)
            elif deferred.releases:
                self._queue.entries[doc_id].releases += deferred.releases
        elif deferred is not None:
            _release_all(deferred.releases)
        if doc_id in self._resolve_after and doc_id not in self._queue:
            self._resolve_after.discard(doc_id)
            self.resolve_soon(doc_id)
        self._wake.set()
        self._update_idle()

    def _update_idle(self) -> None:
        if not self._queue and not self._active:
            self._idle.set()

    async def stop(self, grace_s: float) -> None:
        """Stop taking work; let sends in flight finish for `grace_s`, then cancel the rest."""
        self._stopping = True
        self._stop_event.set()
        self._wake.set()
        for handle in self._rechecks.values():
            handle.cancel()
        self._rechecks.clear()
        jobs = list(self._active.values())
        if jobs:
            _, pending = await asyncio.wait(jobs, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for task in list(self._background):
            task.cancel()
        # Queued documents are not released: they were not handled, so the checkpoint
        # stays before them and the next start reads them again.
        self._queue.clear()
        self._deferred.clear()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- one document ---------------------------------------------------------------------

    async def _job(self, entry: _Entry) -> None:
        doc_id = str(entry.doc["_id"])
        releases = entry.releases
        try:
            doc: JsonDict | None = entry.doc
            assert doc is not None
            self._claim_waiters += 1
            try:
                await self._claim_slots.acquire()
            finally:
                self._claim_waiters -= 1
            try:
                if self._stopping:
                    raise _Stopping
                if not entry.mine:
                    # Another replica's document: it has most likely claimed it by now, and our
                    # feed may not show it yet. A read is cheaper than a conflicting claim.
                    doc = await self._reread(doc_id)
                if doc is None:
                    return
                job = await self._claim(doc, releases)
                if job is None:
                    return
                await self._send_all(job)
            finally:
                self._claim_slots.release()
            await self._write_back(job)
        except (_Stopping, asyncio.CancelledError):
            # Not handled: keep the checkpoint before this document (if not already parked).
            releases.clear()
            self._log.info("send_interrupted", doc_id=doc_id)
            if not self._stopping:
                raise
        except _Abandon as exc:
            self._log.info("send_abandoned", doc_id=doc_id, reason=str(exc))
        finally:
            _release_all(releases)

    async def _claim(self, doc: JsonDict, releases: list[Release]) -> DocJob | None:
        """Claim and hold every task of `doc` that is ours to send (see `claims.py`)."""
        doc_id = str(doc["_id"])
        try:
            self._note_peers(sendable_tasks(doc, on_malformed=lambda ref, problem: None))
        except MalformedTaskError as exc:
            self._metrics.bad_documents.inc()
            self._log.warning("document_skipped", doc_id=doc_id, problem=str(exc))
            return None
        result = await self.claims.claim(doc)
        if result.recheck is not None:
            self._schedule_recheck(doc_id, result.recheck)
        if result.hold is None:
            return None
        tasks = [
            TaskJob(claim, [self._message_job(m, claim.takeover) for m in claim.messages])
            for claim in result.hold.tasks
        ]
        return DocJob(result.hold, tasks, releases)

    def _message_job(
        self, message: OutgoingMessage, uncertain: bool, settle_until: float = 0.0
    ) -> MessageJob:
        # CHT normalises `to` at send time and posts the raw value when that fails
        # (messaging.js); RapidPro may then take it as someone else's local number. Only a
        # number RapidPro keeps as sent goes out: anything else fails here, never posted.
        urn = rapidpro_urn(self._cht.app_settings, message.to)
        refused = None
        if isinstance(urn, Refused):
            refused = Rejected(urn.reason)
            self._metrics.messages_failed.inc()
            self._log.error(
                "message_rejected",
                message_uuid=message.uuid,
                to=mask(message.to),
                attempt=0,
                reason=urn.reason,
            )
        return MessageJob(
            message=message,
            urn=urn if isinstance(urn, str) else "",
            text=escape_text(message.text),
            uncertain=uncertain,
            settle_until=settle_until,
            result=refused,
            backoff=Backoff(
                initial=self._settings.retry_initial_s, maximum=self._settings.retry_max_s
            ),
        )

    async def _send_all(self, job: DocJob) -> None:
        for task in list(job.tasks):
            try:
                for message in task.messages:
                    while message.result is None:
                        if message.parts is None:
                            await self._attempt(job, task, message)
                        else:
                            await self._send_parts(job, task, message)
            except _TaskLost:
                self._log.warning("claim_lost", doc_id=job.doc["_id"], task=task.ref.key)
            except _Abandon as exc:
                # What was sent before is still written back; what was not, is looked at
                # again once a claim left behind may have expired.
                self._log.info("send_abandoned", doc_id=job.doc["_id"], reason=str(exc))
                self._schedule_recheck(str(job.doc["_id"]), datetime.now(UTC) + self._claim_ttl)
                return

    async def _attempt(self, job: DocJob, task: TaskJob, message: MessageJob) -> None:
        doc_id = str(job.doc["_id"])
        target = await self._ready()
        log = self._log.bind(doc_id=doc_id, message_uuid=message.message.uuid)
        message.attempts += 1
        if message.uncertain:
            settle = message.settle_until - time.monotonic()
            if settle > 0:
                log.info("reconcile_waiting", delay_s=round(settle, 2))
                await self._sleep(settle)
                target = await self._ready()
            found = await self._reconcile(target, task, message, log)
            if found is not None:
                message.result = Accepted(found, adopted=True)
                self._metrics.messages_adopted.inc()
                log.info("message_adopted", gateway_ref=found.id, to=mask(message.urn))
                return
        started = time.monotonic()
        try:
            async with self._send_slots:
                if self._stopping:
                    raise _Stopping
                started = time.monotonic()  # the request's own time, not the wait for a slot
                broadcast = await self._rapidpro.send_broadcast(
                    target,
                    [message.urn],
                    message.text,
                    before_request=lambda: self._still_ours(job, task, message),
                )
        except PermanentError as exc:
            if isinstance(exc, AuthError | UpstreamConfigError):
                self._pause_for_config(target, exc)
                return
            limit = text_limit(str(exc))
            reason = str(exc)
            if limit is not None and message.parts is None and not message.is_part:
                # Longer than this RapidPro takes: nothing was created, send it in parts.
                try:
                    self._split(message, limit, log)
                    return
                except TooManyParts as too_long:
                    reason = f"{exc} Not sent in parts: {too_long}"
            message.result = Rejected(reason)
            self._metrics.messages_failed.inc()
            self._metrics.send_errors.labels("rejected").inc()
            log.error(
                "message_rejected",
                to=mask(message.urn),
                attempt=message.attempts,
                reason=reason,  # RapidPro's text, numbers masked by the client
            )
            return
        except RetryableError as exc:
            if exc.ambiguous:
                message.uncertain = True
                # RapidPro may still be working on the request we gave up on.
                message.settle_until = time.monotonic() + self._settings.send_timeout_s
            elif not message.uncertain:
                self.claims.not_posted(message.message.uuid)  # nothing reached RapidPro
            await self._retry_later(job, message, exc, log)
            return
        self._outage.recovered()
        self._paused_until = 0.0
        message.result = Accepted(broadcast, adopted=False)
        elapsed = time.monotonic() - job.started
        self._metrics.messages_sent.inc()
        self._metrics.send_latency.observe(elapsed)
        log.info(
            "message_sent",
            gateway_ref=broadcast.id,
            rapidpro_status=broadcast.status,
            to=mask(message.urn),
            attempt=message.attempts,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )

    def _split(self, message: MessageJob, limit: int, log: Any) -> None:
        """Cut a message RapidPro refused as too long into parts of at most `limit`."""
        texts = split(message.message.text, limit, escaped_length=2)
        message.parts = [
            MessageJob(
                message=message.message,
                urn=message.urn,
                text=escape_text(text),
                uncertain=message.uncertain,  # a takeover looks every part up first
                settle_until=message.settle_until,
                backoff=Backoff(
                    initial=self._settings.retry_initial_s, maximum=self._settings.retry_max_s
                ),
                is_part=True,
            )
            for text in texts
        ]
        log.info("message_split", parts=len(texts), limit=limit)

    async def _send_parts(self, job: DocJob, task: TaskJob, message: MessageJob) -> None:
        """Send a split message's parts, in order; its result is theirs together."""
        parts = message.parts or []
        sent: list[Accepted] = []
        for number, part in enumerate(parts, 1):
            while part.result is None:
                await self._attempt(job, task, part)
            if isinstance(part.result, Rejected):
                message.result = Rejected(
                    f"part {number}/{len(parts)}: {part.result.summary}",
                    parts=tuple(a.broadcast.id for a in sent),
                )
                return
            sent.append(part.result)
        message.result = Accepted(
            sent[0].broadcast,
            adopted=all(a.adopted for a in sent),
            parts=tuple(a.broadcast.id for a in sent),
        )

    async def _reconcile(
        self, target: Target, task: TaskJob, message: MessageJob, log: Any
    ) -> Broadcast | None:
        while True:
            try:
                return await self._reconciler.find(target, message, task.claim.since)
            except RetryableError as exc:
                log.warning("reconcile_retrying", error=str(exc))
                await self._sleep(message.backoff.next_delay())
                await self._ready()
            except (AuthError, UpstreamConfigError) as exc:
                self._pause_for_config(target, exc)
                target = await self._ready()

    async def _retry_later(
        self, job: DocJob, message: MessageJob, exc: RetryableError, log: Any
    ) -> None:
        # The job is parked: its document no longer holds the checkpoint back (a restart
        # finds it again through the start-up sweep).
        _release_all(job.releases)
        if exc.retry_after is not None:
            kind, delay = "throttled", 0.0  # the budget now waits for Retry-After
        else:
            kind = "unavailable"
            delay = self._outage.failed()  # every job waits for the same end of the outage
        self._metrics.send_errors.labels(kind).inc()
        log.warning(
            "rapidpro_send_retrying",
            attempt=message.attempts,
            delay_s=round(delay, 2),
            uncertain=message.uncertain,
            error=str(exc),
        )
        await self._sleep(delay)

    def _pause_for_config(self, target: Target, exc: GatewayError) -> None:
        now = time.monotonic()
        if self._paused_until <= now or self._pause_target != target:
            self._log.error("sending_paused", reason=str(exc), retry_in_s=CONFIG_PAUSE_S)
            self._metrics.send_errors.labels("config").inc()
        self._paused_until = max(self._paused_until, now + CONFIG_PAUSE_S)
        self._pause_target = target
        self._pause_reason = str(exc)
        # The token may have been changed in CHT since we read it.
        self._spawn(self._cht.refresh_credentials(force=True), "refresh-credentials")

    @property
    def problem(self) -> str | None:
        """Why sending is paused by RapidPro's answers (a refused token or URL), if it is."""
        if self._pause_target is None or self._paused_until <= time.monotonic():
            return None
        return f"RapidPro refused the configuration: {self._pause_reason}"

    @property
    def refused(self) -> bool:
        """Whether RapidPro refused the token or URL still in use at the last send, with no
        send accepted since: unlike `problem`, this outlasts the pause between retries."""
        target = self._pause_target
        return target is not None and self._paused_until > 0 and self._cht.gate.target == target

    async def _ready(self) -> Target:
        """Wait until sending is allowed; the current target."""
        while True:
            if self._stopping:
                raise _Stopping
            gate = self._cht.gate
            if not gate.open or gate.target is None:
                raise _Abandon(gate.reason or "sending disabled")
            wait = max(self._paused_until, self._outage.until) - time.monotonic()
            if self._pause_target is not None and gate.target != self._pause_target:
                wait = 0.0  # configuration changed since RapidPro refused it: try now
                self._pause_target = None
            if wait <= 0:
                return gate.target
            await self._sleep(min(wait, 5.0))

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up (and stop the job) as soon as the daemon stops."""
        if await sleep_or_wake(self._stop_event, seconds) or self._stopping:
            raise _Stopping

    async def _still_ours(self, job: DocJob, task: TaskJob, message: MessageJob) -> None:
        """The last word before a POST: the claim is held and young (H3 in `claims.py`)."""
        await self._renew_if_stale(job)
        if task not in job.tasks:
            raise _TaskLost  # another writer took this task meanwhile: do not post
        self.claims.posting(message.message.uuid)

    async def _renew_if_stale(self, job: DocJob) -> None:
        """Before a POST: renew our claims unless their commit is younger than TTL/4.

        So every POST starts within TTL/4 of a held claim and lands within TTL/4 +
        SEND_TIMEOUT; another replica takes a claim over only after TTL, and looks the
        message up in RapidPro before sending it (`claims.py`, H3 and H4).
        """
        if time.monotonic() - job.hold.committed_at < self._claim_ttl.total_seconds() / 4:
            return
        held = await self.claims.renew(job.hold)
        job.tasks[:] = [task for task in job.tasks if task.claim in job.hold.tasks]
        if not held:
            raise _Abandon("claims lost to another writer")

    # -- write-back -----------------------------------------------------------------------

    async def _write_back(self, job: DocJob) -> None:
        doc_id = str(job.doc["_id"])
        results = {
            task.ref: task for task in job.tasks if any(m.result is not None for m in task.messages)
        }
        me = self.identity

        def apply(doc: JsonDict) -> bool:
            changed = False
            for ref, task_job in results.items():
                task = task_at(doc, ref)
                if task is not None and _already_written(task, task_job):
                    continue  # an earlier try landed though its answer was lost
                if (
                    task is None
                    or task.get("state") not in SENDABLE_STATES
                    or not any(
                        e.instance == me.instance and e.boot == me.boot for e in claim_entries(task)
                    )
                    or not same_messages(task, tuple(m.message for m in task_job.messages))
                ):
                    # Not the task we claimed and posted for any more (cleared, muted,
                    # resent, written by another claimant): what happened stays in the log.
                    self._log.warning(
                        "write_back_skipped",
                        doc_id=doc_id,
                        task=ref.key,
                        reason="task changed since it was claimed",
                    )
                    continue
                for message in task_job.messages:
                    changed |= _apply_result(task, message.result)
            return changed

        # Nothing waits for it: it rides along with the next claims (BulkWriter's lazy writes).
        await self._update(job.doc, apply, what="write_back", siblings=job.hold.siblings, lazy=True)

    async def _update(
        self,
        doc: JsonDict,
        change: Callable[[JsonDict], bool],
        *,
        what: str,
        siblings: bool = False,
        lazy: bool = False,
    ) -> JsonDict | None:
        """Apply `change` to `doc` and write it; on conflict re-read and re-apply.

        A write answered `accepted` (a cluster without quorum) is looked for among the
        document's leaves, and written again if no copy read has it; conflicting branches
        (`siblings`: seen when the claim was confirmed) are merged afterwards.

        Returns the written revision, or None if `change` found nothing to do.
        """
        doc_id = str(doc["_id"])
        current = clone(doc)
        backoff = Backoff(
            initial=self._settings.retry_initial_s, maximum=self._settings.retry_max_s
        )
        rounds = 0
        while True:
            if not change(current):
                return None
            try:
                result = await self._writer.write(current, lazy=lazy)
            except RetryableError as exc:
                # CouchDB is unreachable: keep the result in memory and keep trying. If we
                # are stopped first, the claim stays and the next start reconciles it.
                self._log.warning(f"{what}_retrying", doc_id=doc_id, error=str(exc))
                await self._sleep(backoff.next_delay())
                current = clone(doc)
                continue
            if result.ok and result.rev is not None:
                current["_rev"] = result.rev
                self._remember_write(doc_id, result.rev)
                self._on_doc(current)
                if not result.committed and not await self._verify(doc_id, result.rev):
                    self._log.warning(f"{what}_unconfirmed", doc_id=doc_id, rev=result.rev)
                    latest = await self._reread(doc_id)
                    if latest is None:
                        return None
                    doc, current = latest, clone(latest)
                    continue
                if siblings or not result.committed:
                    self._spawn(self._resolve_later(doc_id), f"resolve:{doc_id}")
                return current
            if not result.conflict:
                self._log.error(f"{what}_refused", doc_id=doc_id, error=result.error)
                return None
            self._metrics.write_conflicts.inc()
            rounds += 1
            latest = await self._reread(doc_id)
            if latest is None or rounds >= MAX_WRITE_ROUNDS:
                self._log.error(f"{what}_gave_up", doc_id=doc_id, rounds=rounds)
                if latest is not None:
                    # Look again later: our claim is still there, so the message is looked
                    # up in RapidPro (and its broadcast adopted) rather than lost or resent.
                    self._schedule_recheck(doc_id, datetime.now(UTC) + RETRY_GAVE_UP)
                return None
            doc = latest
            current = clone(latest)

    async def _verify(self, doc_id: str, rev: str) -> bool:
        """Whether a read quorum of copies has our `accepted` revision (or its descendants)."""
        for delay in VERIFY_DELAYS:
            try:
                leaves = await self._couch.leaves(doc_id)
            except RetryableError as exc:
                self._log.warning("verify_retrying", doc_id=doc_id, error=str(exc))
                leaves = []
            if any(leaf.descends_from(rev) for leaf in leaves):
                return True
            await self._sleep(delay)
        return False

    async def _resolve_later(self, doc_id: str, delay: float = 0.0) -> None:
        """Merge the branches our writes may have left (a cluster); failures are retried by
        the next look at the document."""
        try:
            if delay:
                await self._sleep(delay)
            await self.resolver.resolve(doc_id)
        except GatewayError as exc:
            self._log.warning("resolve_retrying", doc_id=doc_id, error=str(exc))
            self._schedule_recheck(doc_id, datetime.now(UTC) + RETRY_GAVE_UP)

    async def _reread(self, doc_id: str) -> JsonDict | None:
        backoff = Backoff(
            initial=self._settings.retry_initial_s, maximum=self._settings.retry_max_s
        )
        while True:
            try:
                return await self._docs.get(doc_id)
            except RetryableError as exc:
                self._log.warning("reread_retrying", doc_id=doc_id, error=str(exc))
                await self._sleep(backoff.next_delay())

    # -- foreign claims -------------------------------------------------------------------

    def _note_peers(self, tasks: list[SendableTask]) -> None:
        for task in tasks:
            if task.claim is not None and task.claim.at is not None:
                self._presence.note(task.claim.instance, task.claim.at)

    def _preferred(self, doc_id: str) -> bool:
        """Whether this replica is the one that should claim `doc_id` first."""
        peers = self._presence.peers()
        if not peers:
            return True

        def weight(instance: str) -> bytes:
            return hashlib.blake2b(f"{instance}\x00{doc_id}".encode(), digest_size=8).digest()

        mine = self.identity.instance
        return max([mine, *peers], key=weight) == mine

    def _schedule_recheck(self, doc_id: str, at: datetime) -> None:
        """Look at a document again when another replica's claim on it would expire."""
        if doc_id in self._rechecks or self._stopping:
            return
        delay = max(0.0, (at - datetime.now(UTC)).total_seconds()) + 1.0
        loop = asyncio.get_running_loop()
        self._rechecks[doc_id] = loop.call_later(
            delay, lambda: self._spawn(self._recheck(doc_id), f"recheck:{doc_id}")
        )

    async def _recheck(self, doc_id: str) -> None:
        self._rechecks.pop(doc_id, None)
        if self._stopping:
            return
        try:
            doc = await self._couch.get(doc_id)
        except GatewayError as exc:
            self._log.warning("recheck_retrying", doc_id=doc_id, error=str(exc))
            self._schedule_recheck(doc_id, datetime.now(UTC) + timedelta(seconds=30))
            return
        if doc is not None:
            self.offer(doc)


def _already_written(task: JsonDict, task_job: TaskJob) -> bool:
    """Whether `task` already carries the broadcast we are about to record."""
    refs = [m.result.broadcast.id for m in task_job.messages if isinstance(m.result, Accepted)]
    return bool(refs) and task.get("gateway_ref") == refs[-1]


def _apply_result(task: JsonDict, result: Accepted | Rejected | None) -> bool:
    """CHT's state for a send outcome, written with `setTaskState`.

    A message sent in parts keeps the first part's broadcast as the task's `gateway_ref`
    (CHT's field) and every part's in `gateway_refs`.
    """
    if isinstance(result, Accepted):
        broadcast = result.broadcast
        # A broadcast's status only says whether messages were created, never delivery
        # (spec §8.9): accepted is `received-by-gateway`, and polling moves it on. Only
        # `failed` (recipients could not be resolved) is final.
        if broadcast.status == "failed":
            changed = set_task_state(task, State.FAILED, "Failed", broadcast.id)
        else:
            changed = set_task_state(task, State.RECEIVED_BY_GATEWAY, "Queued", broadcast.id)
        if result.parts:
            task["gateway_refs"] = list(result.parts)
        return changed
    if isinstance(result, Rejected):
        changed = set_task_state(task, State.FAILED, result.summary)
        if result.parts:
            task["gateway_refs"] = list(result.parts)
        return changed
    return False


def _release_all(releases: list[Release]) -> None:
    while releases:
        releases.pop()()
