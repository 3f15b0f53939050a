"""The follower of RapidPro's message log: delivery status, mirroring and recovery from one scan.

`GET /api/v2/messages.json` lists every message of the workspace, newest first (rapidpro-api
§4). One follower reads it, in rounds every `CHT_RAPIDPRO_POLL_INTERVAL`, for three purposes:

1. **Delivery status** of the messages this daemon sent (and of mirrored ones): see
   `refresh.py` for when each is asked for again and whether by a window scan or a look-up,
   whichever costs fewer requests given how dense our messages are in the workspace's traffic.
   Rows bring news only when a status differs from what CHT shows (`TrackedIndex` keeps that
   in one byte): only then are tasks read from CouchDB, one request per page (`status.py`).
2. **Mirroring** (`CHT_RAPIDPRO_MIRROR_OUTGOING`): outgoing rows that are not ours become
   CHT outgoing-message documents (`mirror.py`).
3. **Recovery** (`CHT_RAPIDPRO_INCOMING_FLOWS`): incoming rows handled by a CHT flow that have
   no report are stored as the webhook would have (`recovery.py`).

Mirroring and recovery need every row exactly once, in a **forward scan**: the rows created
since the last round (`Position.top`, minus `OVERLAP_S` for rows a read replica showed late),
read newest first until the top of the previous round. A forward scan the budget cut short
leaves a *gap* that later rounds read (oldest moments of the log are never skipped); rows read
in the overlap are recognised by id. Without mirroring or recovery there is no forward scan:
delivery status alone reads only what tracked messages need, and nothing at all while nothing
is tracked. A refresh scan that reaches the present is one scan with the forward scan.

**Decisions** wait `CHT_RAPIDPRO_LOG_GRACE` after a row was first read. An outgoing row is ours
when its broadcast id (or, for a mirrored message, its message id) is a `gateway_ref` in CHT, or
when it matches a send of ours CouchDB does not name yet (`OwnContent`: claimed, posted, not
written back); such a row waits until the claim is settled. An incoming row waits until RapidPro's
webhook call for it can no longer write (RapidPro lists a message only once its flow has run, so
the grace counts from after the webhook call, and must exceed the time a webhook store can
take: CouchDB's timeout). Undecided rows are kept in memory; `Position.floor` (the oldest of
them) is where a restarted follower reads again from, so a crash loses no decision (the writes
are idempotent: deterministic ids, see `mirror.py` and `recovery.py`).

**Exactly once.** Invariant: each RapidPro message is mirrored into at most one document,
each incoming SMS of a CHT flow ends up in at most one report, and none of either is dropped
while RapidPro still lists it (90 days). Why, case by case:

- *Re-scans* (the overlap, a gap, the hourly sweep) read rows again: mirrors and reports have
  deterministic `_id`s (`mirror.py`; the webhook's own id, `recovery.py`), so a second write is
  a conflict; a row is also checked against CouchDB before it is written.
- *A crash or restart* between reading a row and writing its document: the position's `floor`
  is at or below every undecided row, so a restart reads it again; position saves lag, which
  only means more re-reading. A write that failed (CouchDB down) leaves the row undecided.
- *Two leaders* for a moment (presence not yet seen): both write the same `_id`s; one wins, the
  other meets a conflict. On a cluster both may be `accepted` on different copies: the
  conflicting branches are merged by `conflicts.py` (mirrors carry tasks, reports are
  `sms-rapidpro:` documents of which one version is kept), as for the webhook's own writes.
- *The webhook and recovery* on one SMS: both use the id the webhook's body carries, so
  CouchDB keeps one whichever writes first (the recovery waits LOG_GRACE after the SMS was
  listed, which RapidPro does only after the webhook call, so normally the webhook has long
  finished).
- *Our own sends* are never mirrored: a row is ours when CouchDB or the index knows its
  broadcast (every part of a split message too), and a row to a number we have claimed but not
  written back waits; a broadcast the sender may still adopt after an uncertain POST is such a
  claim.

**Position** is one `_local/cht-rapidpro-log` document per database (like the feed checkpoint,
never replicated), shared by the replicas: only the *leader*, the live replica whose instance
name sorts first (`replicas.py`), follows the log; the others read nothing from RapidPro, so
the workspace's budget is spent once. A replica that takes over resumes from the shared
position. Two replicas that both believe they lead for a moment only repeat work: mirrored and
recovered documents have deterministic ids (a conflict means done), status writes are
idempotent.

**Budget**: every request comes out of the client-side `messages` budget (runs: `runs`), paced
so a round spends at most three times its share of what is left this hour (`_allowance`); the
forward scan goes first, then refreshes, most overdue first. A 429 or an outage ends the round.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from .chtconfig import ChtConfig
from .config import Settings
from .couch.client import BulkWriter, CouchClient, JsonDict
from .errors import AuthError, GatewayError, RetryableError, UpstreamConfigError
from .incoming import IncomingStore, StoreRefusedError, doc_id_for
from .logs import get_logger
from .metrics import Metrics
from .mirror import minify, mirror_doc, mirror_id, recipient
from .rapidpro.client import RapidProClient
from .rapidpro.models import Message, Run, Target
from .rapidpro.throttle import MESSAGES
from .recovery import IncomingRow, identity, pair_runs, reported_ms, webhook_from
from .refresh import CEILING_S, Density, Lookup, Margins, Scan, ScanProgress, plan, refresh_interval
from .replicas import Presence
from .retry import sleep_or_wake
from .status import REF_VIEW, StatusWriter, view_keys
from .tracking import (
    MIRROR_BASE,
    OwnContent,
    TrackedIndex,
    broadcast_key,
    code_of_status,
    mirror_key,
)

POSITION_ID = "cht-rapidpro-log"
#: Forward scans re-read this far below the last round's newest row (read replicas lag).
OVERLAP_S = 30.0
#: Recovery also reads the incoming messages of CHT flows this far back, every LATE_SWEEP_ROUNDS
#: rounds (hourly at the default interval): RapidPro lists an incoming message only once a flow
#: handled it, which a busy RapidPro can do minutes after the message arrived, below a forward
#: scan's overlap.
LATE_WINDOW_S = 3 * 3600.0
LATE_SWEEP_ROUNDS = 60
#: A message of a CHT flow whose run cannot be found is stored under its own id after this.
PAIR_WAIT_S = 1800.0
#: A round spends at most this many times its share of the budget left this hour.
PACE = 3.0
MIN_ALLOWANCE = 10
#: The position is written at most this often (and on shutdown).
SAVE_INTERVAL_S = 60.0
CONTACTS_VIEW = ("medic-client", "contacts_by_phone")
CONTACT_CACHE = 2000
CONTACT_TTL_S = 600.0


def _ts(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def _dt(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


@dataclass(slots=True)
class Position:
    """Where the follower is in RapidPro's log (the shared `_local` document)."""

    top: float | None = None  # newest created_on a complete forward scan reached
    gaps: list[tuple[float, float]] = field(default_factory=list)  # unread [low, high]
    floor: float | None = None  # oldest undecided row: a restart reads again from here
    late_sweep_at: float | None = None
    density: Density = field(default_factory=Density)
    totals: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> JsonDict:
        def iso(value: float | None) -> str | None:
            return None if value is None else _dt(value).isoformat()

        return {
            "top": iso(self.top),
            "gaps": [[iso(low), iso(high)] for low, high in self.gaps],
            "floor": iso(self.floor),
            "late_sweep_at": iso(self.late_sweep_at),
            "density": self.density.to_json(),
            "totals": dict(self.totals),
        }

    @classmethod
    def from_json(cls, doc: JsonDict | None) -> Position:
        if not doc:
            return cls()

        def moment(value: Any) -> float | None:
            if not isinstance(value, str):
                return None
            try:
                return datetime.fromisoformat(value).timestamp()
            except ValueError:
                return None

        gaps = []
        for item in doc.get("gaps") or []:
            if isinstance(item, list) and len(item) == 2:
                low, high = moment(item[0]), moment(item[1])
                if low is not None and high is not None and low < high:
                    gaps.append((low, high))
        totals = doc.get("totals")
        return cls(
            top=moment(doc.get("top")),
            gaps=gaps,
            floor=moment(doc.get("floor")),
            late_sweep_at=moment(doc.get("late_sweep_at")),
            density=Density.from_json(doc.get("density")),
            totals={
                k: v
                for k, v in (totals or {}).items()
                if isinstance(v, int) and not isinstance(v, bool)
            }
            if isinstance(totals, dict)
            else {},
        )


@dataclass(slots=True)
class Pending:
    """A row waiting for its decision (mirror it? recover it?)."""

    row: Message
    first_seen: float


@dataclass(slots=True)
class RoundReport:
    """What one round did (the canonical `status_poll_completed` line)."""

    tracked: int = 0
    due: int = 0
    window_s: float = 0.0
    requests: int = 0
    scans: int = 0
    lookups: int = 0
    runs_requests: int = 0
    rows: int = 0
    matched: int = 0
    updated: int = 0
    refreshed: int = 0
    dropped: int = 0
    conflicts: int = 0
    overdue: int = 0
    mirrored: int = 0
    recovered: int = 0
    deferred: int = 0
    undecided: int = 0
    stopped: str | None = None


class _Spend:
    """Requests this round may still make (None: no limit)."""

    def __init__(self, allowance: int | None) -> None:
        self.left = allowance

    def ok(self) -> bool:
        return self.left is None or self.left > 0

    def take(self) -> None:
        if self.left is not None:
            self.left -= 1


class _Cut(Exception):
    """The round's allowance is spent."""


class MessageLog:
    """Follows RapidPro's message log (see the module docstring)."""

    def __init__(
        self,
        *,
        couch: CouchClient,
        writer: BulkWriter,
        rapidpro: RapidProClient,
        cht: ChtConfig,
        settings: Settings,
        index: TrackedIndex,
        own: OwnContent,
        store: IncomingStore,
        presence: Presence,
        metrics: Metrics,
        on_accepted: Callable[[str], None] = lambda _doc_id: None,
        on_written: Callable[[str, str | None], None] = lambda _doc_id, _rev: None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._couch = couch
        self._writer = writer
        self._rapidpro = rapidpro
        self._cht = cht
        self._settings = settings
        self.index = index
        self.own = own
        self._store = store
        self._presence = presence
        self._metrics = metrics
        self._clock = clock
        self.statuses = StatusWriter(
            couch=couch,
            writer=writer,
            cht=cht,
            index=index,
            metrics=metrics,
            on_accepted=on_accepted,
            on_written=on_written,
        )
        self._log = get_logger(component="poller")
        self.mirror = settings.mirror_outgoing
        self.flows = frozenset(settings.incoming_flows)
        self.position = Position()
        self._loaded = False
        self._prepared = False
        self._contacts_view = False
        self._undecided: dict[Any, Pending] = {}
        self._recent: dict[Any, float] = {}  # ids of rows read near the top: created_on
        self._incoming: dict[Any, IncomingRow] = {}  # rows of CHT flows read lately
        self._contacts: dict[str, tuple[float, JsonDict | None]] = {}
        self._lookups_work = True
        self._dirty = False
        self._saved_at = -math.inf
        self.last_round: RoundReport | None = None
        self.rounds = 0
        self.stats: Counter[str] = Counter()  # since start: requests, mirrored, recovered, ...
        margin = settings.clock_skew_s
        self._margins = Margins(
            exact_s=1.0, before_s=margin, after_s=margin + settings.send_timeout_s
        )

    # -- set-up -----------------------------------------------------------------------------

    @property
    def follows_log(self) -> bool:
        """Whether rounds read the whole log forward (mirroring or recovery is on)."""
        return self.mirror or bool(self.flows)

    async def prepare(self) -> None:
        """Which of CHT's views the database has (before the feed fills the index)."""
        ref_view = await self._couch.has_view(*REF_VIEW)
        self.statuses.ref_view = ref_view
        self.index.keep_doc_ids(not ref_view)
        self._contacts_view = await self._couch.has_view(*CONTACTS_VIEW)
        self._prepared = True
        self._log.info(
            "message_log_ready",
            lookup="view" if ref_view else "memory",
            mirror=self.mirror,
            incoming_flows=len(self.flows),
            contacts_view=self._contacts_view,
        )

    def leader(self) -> bool:
        """The live replica with the first instance name follows the log (see the docstring)."""
        names = [self._presence.instance, *self._presence.peers()]
        return min(names) == self._presence.instance

    async def _load(self, now: float) -> None:
        doc = await self._couch.get(f"_local/{POSITION_ID}")
        self.position = Position.from_json(doc)
        position = self.position
        if position.top is None:
            # First start: from now on (earlier traffic is neither mirrored nor recovered).
            position.top = now - self._settings.clock_skew_s
        elif position.floor is not None and position.floor < position.top:
            # Rows read but not decided before a restart: read them again.
            position.gaps.append((position.floor, position.top))
        position.gaps = _merged(position.gaps)
        position.floor = None
        self._loaded = True
        self._dirty = True

    async def save(self, *, force: bool = False) -> None:
        """Store the position: at most every SAVE_INTERVAL_S, and on shutdown (`force`).

        Saving less often only means re-reading more after a crash: what was read after the
        stored position is read again, and decided again idempotently.
        """
        if not self._loaded or not self._dirty:
            return
        if not force and time.monotonic() - self._saved_at < SAVE_INTERVAL_S:
            return
        undecided = [p.row.created_on for p in self._undecided.values() if p.row.created_on]
        self.position.floor = min(undecided).timestamp() - 1 if undecided else None
        body = self.position.to_json()
        body["saved_at"] = self._clock().isoformat()
        body["saved_by"] = self._presence.instance
        await self._couch.put_local(POSITION_ID, body)
        self._dirty = False
        self._saved_at = time.monotonic()

    # -- rounds -----------------------------------------------------------------------------

    async def run(self, stop: Any) -> None:
        """A round every `poll_interval_s` until `stop` (an asyncio.Event) is set."""
        while not stop.is_set():
            try:
                await self.run_once()
            except GatewayError as exc:
                self._log.warning("status_poll_retrying", error=str(exc))
            await sleep_or_wake(stop, self._settings.poll_interval_s)

    def _allowance(self) -> int | None:
        """Requests this round may make: PACE times its share of what is left this hour, and
        never fewer than MIN_ALLOWANCE while that many are left (short intervals)."""
        left = self._rapidpro.budget.remaining(MESSAGES)
        if left is None:
            return None
        share = PACE * left * self._settings.poll_interval_s / 3600.0
        return max(min(left, MIN_ALLOWANCE), math.ceil(share))

    async def run_once(self) -> RoundReport:
        """One round; returns its report (also logged)."""
        report = RoundReport()
        started = time.monotonic()
        gate = self._cht.gate
        if not gate.open or gate.target is None:
            return report
        if not self.leader():
            self._loaded = False  # read the shared position again when leading again
            self._metrics.in_flight.set(len(self.index))
            return report
        if not self._prepared:
            await self.prepare()
        target = gate.target
        now_dt = self._clock()
        now = now_dt.timestamp()
        if not self._loaded:
            await self._load(now)
        report.dropped = self.index.expire(
            now,
            sent_grace_s=self._settings.sent_grace_s,
            max_tracking_s=self._settings.max_tracking_s,
        )
        report.tracked = len(self.index)
        self._metrics.in_flight.set(report.tracked)
        poll = self._settings.poll_interval_s
        due = self.index.due(now, lambda age: refresh_interval(age, poll_s=poll))
        report.due = len(due)
        spend = _Spend(self._allowance())
        actions = plan(
            due,
            self.position.density,
            now=now,
            margins=self._margins,
            lookups_work=self._lookups_work,
            max_lookups=spend.left,
        )
        del due
        main: Scan | None = None
        if self.follows_log:
            top = self.position.top if self.position.top is not None else now
            main = Scan(low=top - OVERLAP_S, high=None)
        for action in list(actions):
            if isinstance(action, Scan) and action.high is None:
                actions.remove(action)
                if main is None:
                    main = action
                else:
                    main.absorb(action)
        host = target.url.host or "rapidpro"
        try:
            if main is not None:
                report.window_s = round(now - main.low, 1)
                forward_low = (self.position.top or now) - OVERLAP_S if self.follows_log else None
                await self._scan(target, main, spend, report, now, collect_low=forward_low)
            if self.follows_log:
                await self._catch_up(target, spend, report, now)
            queue: list[Scan | Lookup] = list(actions)
            while queue:
                action = queue.pop(0)
                if isinstance(action, Scan):
                    queue += await self._scan(target, action, spend, report, now)
                else:
                    await self._lookup(target, action, spend, report, now)
            if self.flows:
                await self._late_sweep(target, spend, report, now)
        except _Cut:
            report.stopped = "budget"
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
        if self.follows_log and report.stopped in (None, "budget"):
            try:
                await self._decide(target, host, report, now)
            except RetryableError as exc:
                self._log.warning("log_decisions_postponed", error=str(exc))
            except (AuthError, UpstreamConfigError) as exc:
                self._log.error("log_decisions_refused", error=str(exc))
        report.undecided = len(self._undecided)
        report.overdue = self.index.overdue(now, CEILING_S + 2 * poll)
        self._prune(now)
        self.position.density.prune(now - self._settings.max_tracking_s - 86400)
        try:
            await self.save()
        except GatewayError as exc:
            self._log.warning("log_position_not_saved", error=str(exc))
        self.rounds += 1
        for name in ("requests", "lookups", "scans", "runs_requests", "updated", "mirrored",
                     "recovered", "deferred"):  # fmt: skip
            self.stats[name] += getattr(report, name)
        self._metrics.status_polls.inc()
        self._metrics.in_flight.set(len(self.index))
        self._metrics.refresh_overdue.set(report.overdue)
        if self.position.top is not None and self.follows_log:
            self._metrics.log_lag.set(max(0.0, now - self.position.top))
        self.last_round = report
        self._log.info(
            "status_poll_completed",
            tracked=report.tracked,
            due=report.due,
            window_s=report.window_s,
            requests=report.requests,
            scans=report.scans,
            lookups=report.lookups,
            runs_requests=report.runs_requests,
            rows=report.rows,
            matched=report.matched,
            updated=report.updated,
            refreshed=report.refreshed,
            overdue=report.overdue,
            dropped=report.dropped,
            conflicts=report.conflicts,
            mirrored=report.mirrored,
            recovered=report.recovered,
            deferred=report.deferred,
            undecided=report.undecided,
            budget_left=self._rapidpro.budget.remaining(MESSAGES),
            stopped=report.stopped,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return report

    # -- reading RapidPro -------------------------------------------------------------------

    async def _pages(
        self, pages: AsyncGenerator[list[Message], None], spend: _Spend, report: RoundReport
    ) -> AsyncGenerator[list[Message], None]:
        """The pages of one listing, each paid for before it is asked for."""
        if not spend.ok():
            raise _Cut
        async with contextlib.aclosing(pages):
            async for page in pages:
                spend.take()
                report.requests += 1
                self._metrics.log_requests.inc()
                report.rows += len(page)
                yield page
                if not spend.ok():
                    raise _Cut

    async def _scan(
        self,
        target: Target,
        scan: Scan,
        spend: _Spend,
        report: RoundReport,
        now: float,
        *,
        collect_low: float | None = None,
        gap: tuple[float, float] | None = None,
    ) -> list[Lookup]:
        """Read [scan.low, scan.high] newest first; returns look-ups for what a scan that
        proved dearer than them left.

        Rows created at or after `collect_low` are forward rows: they move the position and
        are decided on (mirroring, recovery); below it a scan only refreshes statuses.
        """
        top = scan.high if scan.high is not None else now
        progress = ScanProgress(scan=scan, top=top)
        density = self.position.density
        forward = collect_low is not None
        report.scans += 1
        newest: float | None = None
        complete = False
        left: list[Lookup] = []
        listing = self._rapidpro.messages(
            target,
            after=_dt(scan.low),
            before=_dt(scan.high) if scan.high is not None else None,
        )
        try:
            async with contextlib.aclosing(self._pages(listing, spend, report)) as pages:
                async for page in pages:
                    created = [t for row in page if (t := _ts(row.created_on)) is not None]
                    progress.add_page(created, density)
                    if created:
                        newest = max(newest or created[0], max(created))
                    await self._rows(target, page, report, now, collect_low=collect_low)
                    if not forward and not progress.worth_going_on():
                        left = [Lookup(key, scan.priority) for key in progress.uncovered()]
                        break
                else:
                    complete = True
        finally:
            low = scan.low if complete else progress.oldest
            if low is not None:
                density.record(low, top, progress.counts)
                self._dirty = True
            keys = scan.keys if complete else progress.covered()
            report.refreshed += self.index.refreshed_many(keys, now)
            if collect_low is not None:
                self._forward_done(collect_low, gap, complete, progress.oldest, newest)
        return left

    def _forward_done(
        self,
        collect_low: float,
        gap: tuple[float, float] | None,
        complete: bool,
        oldest: float | None,
        newest: float | None,
    ) -> None:
        """Move the position after a forward scan or a gap scan (complete or cut short): what
        a cut-short scan did not reach of [collect_low, ...] is a gap for later rounds."""
        position = self.position
        self._dirty = True
        unread_high = oldest if oldest is not None else newest
        if gap is not None:
            position.gaps.remove(gap)
        if not complete:
            high = unread_high if unread_high is not None else (gap[1] if gap else collect_low)
            if high > collect_low:
                position.gaps.append((collect_low, high))
        if gap is None and newest is not None:
            position.top = max(position.top or newest, newest)
        position.gaps = _merged(position.gaps)

    async def _catch_up(
        self, target: Target, spend: _Spend, report: RoundReport, now: float
    ) -> None:
        """Read the gaps earlier rounds left, newest first."""
        for gap in sorted(self.position.gaps, key=lambda g: g[1], reverse=True):
            scan = Scan(low=gap[0], high=gap[1])
            await self._scan(target, scan, spend, report, now, collect_low=gap[0], gap=gap)

    async def _lookup(
        self, target: Target, lookup: Lookup, spend: _Spend, report: RoundReport, now: float
    ) -> None:
        key = lookup.key
        if not self.index.tracked(key):
            return
        if key >= MIRROR_BASE:
            listing = self._rapidpro.messages(target, message_id=key - MIRROR_BASE)
        else:
            listing = self._rapidpro.messages(target, broadcast=key)
        report.lookups += 1
        async with contextlib.aclosing(self._pages(listing, spend, report)) as pages:
            async for page in pages:
                mine = [
                    row
                    for row in page
                    if (key >= MIRROR_BASE and mirror_key(row.id) == key)
                    or (key < MIRROR_BASE and broadcast_key(row.broadcast) == key)
                ]
                if len(mine) < len(page) and self._lookups_work:
                    # The filter was ignored (RapidPro dropped it): scans only from now on.
                    self._lookups_work = False
                    self._log.warning("status_lookup_unsupported", gateway_ref=key)
                await self._rows(target, mine, report, now)
                break  # one page: a message, or a broadcast's few recipients
        self.index.refreshed(key, now)
        report.refreshed += 1

    async def _late_sweep(
        self, target: Target, spend: _Spend, report: RoundReport, now: float
    ) -> None:
        """Incoming messages of CHT flows listed late (see LATE_WINDOW_S), once an hour."""
        position = self.position
        every = LATE_SWEEP_ROUNDS * self._settings.poll_interval_s
        if position.late_sweep_at is not None and now - position.late_sweep_at < every:
            return
        listing = self._rapidpro.messages(target, after=_dt(now - LATE_WINDOW_S), folder="flows")
        async with contextlib.aclosing(self._pages(listing, spend, report)) as pages:
            async for page in pages:
                self._collect_incoming(page, now, late=True)
        position.late_sweep_at = now
        self._dirty = True

    # -- rows -------------------------------------------------------------------------------

    async def _rows(
        self,
        target: Target,
        rows: list[Message],
        report: RoundReport,
        now: float,
        *,
        collect_low: float | None = None,
    ) -> None:
        """Statuses of our messages in a page (written at once), and the forward rows (created
        at or after `collect_low`) to decide on."""
        updates: dict[int, list[Message]] = {}
        for row in rows:
            if row.direction != "out":
                continue
            for key in (broadcast_key(row.broadcast), mirror_key(row.id)):
                if key is None or not self.index.tracked(key):
                    continue
                created = _ts(row.created_on)
                if created is not None:
                    self.index.seen(key, created, now)
                code = code_of_status(row.status)
                if code is not None and code != self.index.code(key):
                    updates.setdefault(key, []).append(row)
        if updates:
            report.matched += len(updates)
            updated, conflicts = await self.statuses.write(
                updates, host=target.url.host or "rapidpro", now=now
            )
            report.updated += updated
            report.conflicts += conflicts
        if collect_low is not None:
            self._collect(rows, now, collect_low)

    def _collect(self, rows: Iterable[Message], now: float, low: float) -> None:
        forward = [r for r in rows if (t := _ts(r.created_on)) is not None and t >= low]
        for row in forward:
            if row.id in self._recent or row.id in self._undecided:
                continue
            created = _ts(row.created_on)
            if created is None:
                continue
            self._recent[row.id] = created
            if row.direction == "out" and self.mirror and not self._ours(row):
                self._undecided[row.id] = Pending(row, now)
        self._collect_incoming(forward, now, late=False)

    def _collect_incoming(self, rows: Iterable[Message], now: float, *, late: bool) -> None:
        if not self.flows:
            return
        for row in rows:
            if row.direction != "in" or row.flow is None or row.flow.uuid not in self.flows:
                continue
            if row.id in self._incoming or row.id in self._undecided:
                continue
            item = IncomingRow.of(row)
            if item is None:
                continue
            self._incoming[row.id] = item
            self._undecided[row.id] = Pending(row, now)
            if late:
                self._log.info("incoming_found_late", message_id=row.id)

    def _ours(self, row: Message) -> bool:
        keys = (broadcast_key(row.broadcast), mirror_key(row.id))
        return any(key is not None and self.index.is_ours(key) for key in keys)

    def _prune(self, now: float) -> None:
        top = self.position.top or now
        floor = top - OVERLAP_S - 5
        self._recent = {i: t for i, t in self._recent.items() if t >= floor or i in self._undecided}
        keep_in = now - max(LATE_WINDOW_S, PAIR_WAIT_S) - 3600
        self._incoming = {
            i: item
            for i, item in self._incoming.items()
            if item.created_on.timestamp() >= keep_in or i in self._undecided
        }
        stale = now - CONTACT_TTL_S
        if len(self._contacts) > CONTACT_CACHE:
            self._contacts = {p: v for p, v in self._contacts.items() if v[0] >= stale}

    # -- decisions --------------------------------------------------------------------------

    def _ready(self, pending: Pending, now: float) -> bool:
        grace = self._settings.log_grace_s
        if now >= pending.first_seen + grace:
            return True
        created = _ts(pending.row.created_on)
        # A row first read long after it was created (a catch-up) had its grace already.
        return created is not None and now >= created + self._settings.clock_skew_s + 5 * grace

    async def _decide(self, target: Target, host: str, report: RoundReport, now: float) -> None:
        ready = [p for p in self._undecided.values() if self._ready(p, now)]
        if not ready:
            return
        out = [p for p in ready if p.row.direction == "out"]
        inc = [p for p in ready if p.row.direction == "in"]
        if out:
            await self._mirror(out, host, report, now)
        if inc:
            await self._recover(target, inc, report, now)

    async def _mirror(
        self, ready: list[Pending], host: str, report: RoundReport, now: float
    ) -> None:
        candidates = []
        for pending in ready:
            row = pending.row
            if self._ours(row):
                del self._undecided[row.id]
            elif self.own.matches(row.urn, row.text):
                report.deferred += 1  # a send of ours not written back yet: wait
            else:
                candidates.append(pending)
        if not candidates:
            return
        known = await self._known_refs(
            [(broadcast_key(p.row.broadcast), p.row.id) for p in candidates], host
        )
        new = []
        for pending in candidates:
            row = pending.row
            if mirror_id(host, row.id) in known or (
                row.broadcast is not None and row.broadcast in known
            ):
                # Ours, or mirrored already (by a replica, or before a restart).
                del self._undecided[row.id]
                continue
            new.append(row)
        contacts = await self._contacts_for([recipient(row.urn) for row in new], now)
        docs = []
        for row in new:
            phone = recipient(row.urn)
            contact = contacts.get(phone) if phone else None
            doc = mirror_doc(row, host=host, contact=contact, now=self._clock())
            if doc is None:
                del self._undecided[row.id]
                self._log.info("mirror_skipped", message_id=row.id, reason="no number or text")
                continue
            docs.append((row, doc))
        # Concurrent writes share `_bulk_docs` requests (the writer's group commit). A row
        # leaves the undecided ones only once its document is written (or was already): a
        # failed write is tried again next round, and a restart reads the row again.
        results = await asyncio.gather(
            *(self._writer.write(doc) for _, doc in docs), return_exceptions=True
        )
        failed: GatewayError | None = None
        for (row, doc), result in zip(docs, results, strict=True):
            if isinstance(result, GatewayError):
                failed = result
                continue
            if isinstance(result, BaseException):
                raise result
            del self._undecided[row.id]
            if result.ok:
                report.mirrored += 1
                self._metrics.messages_mirrored.inc()
                self._bump("mirrored")
                self.index.update_doc(doc, now)
                created = _ts(row.created_on)
                key = mirror_key(row.id)
                if key is not None and created is not None and self.index.tracked(key):
                    self.index.seen(key, created, now)
                self._log.info(
                    "message_mirrored",
                    doc_id=doc["_id"],
                    message_id=row.id,
                    broadcast=row.broadcast,
                    flow=row.flow.uuid if row.flow else None,
                    rapidpro_status=row.status,
                    contact_found="contact" in doc["tasks"][0]["messages"][0],
                )
            elif not result.conflict:
                self._log.error("mirror_write_refused", doc_id=doc["_id"], error=result.error)
        if failed is not None:
            self._log.warning("mirror_write_retrying", error=str(failed))

    async def _known_refs(self, items: list[tuple[int | None, Any]], host: str) -> set[Any]:
        """Which of these broadcasts and mirror ids CHT holds as a `gateway_ref` (the view), or
        which mirror documents exist (without it)."""
        if self.statuses.ref_view:
            keys: list[Any] = []
            for key, message_id in items:
                if key is not None:
                    keys += view_keys(key, host)
                keys.append(mirror_id(host, message_id))
            rows = await self._couch.view(*REF_VIEW, keys=keys)
            found: set[Any] = set()
            for row in rows:
                value = row.get("key")
                found.add(value)
                if isinstance(value, str) and value.isdigit():
                    found.add(int(value))
            return found
        docs = await self._couch.get_many([mirror_id(host, message_id) for _, message_id in items])
        return set(docs)

    async def _contacts_for(
        self, phones: Iterable[str | None], now: float
    ) -> dict[str, JsonDict | None]:
        """The CHT contact of each number (its minified lineage), as CHT's transitions find the
        sender of an SMS: the first row of `medic-client/contacts_by_phone` (one request for
        the numbers not cached)."""
        wanted = {p for p in phones if p}
        if not wanted or not self._contacts_view:
            return {}
        found: dict[str, JsonDict | None] = {}
        ask = []
        for phone in wanted:
            cached = self._contacts.get(phone)
            if cached is not None and now - cached[0] < CONTACT_TTL_S:
                found[phone] = cached[1]
            else:
                ask.append(phone)
        if ask:
            rows = await self._couch.view(*CONTACTS_VIEW, keys=sorted(ask), include_docs=True)
            for row in rows:
                key, doc = row.get("key"), row.get("doc")
                if isinstance(key, str) and key not in found and isinstance(doc, dict):
                    found[key] = minify(doc)
            for phone in ask:
                found.setdefault(phone, None)
                self._contacts[phone] = (now, found[phone])
        return found

    async def _recover(
        self, target: Target, ready: list[Pending], report: RoundReport, now: float
    ) -> None:
        runs = await self._runs_for(target, ready, report)
        paired = pair_runs(self._incoming.values(), runs)
        mode = self._settings.incoming_id
        decisions = []
        for pending in ready:
            row = pending.row
            found = identity(
                row,
                paired.get(row.id),
                mode=mode,
                waited_s=now - pending.first_seen,
                pair_wait_s=PAIR_WAIT_S,
            )
            decisions.append((pending, found))
        ids = [doc_id_for(i) for _, found in decisions for i in found.candidates]
        existing = set(await self._couch.get_many(ids)) if ids else set()
        by_cht = await self._store.seen_by_cht(
            [i for _, found in decisions for i in found.candidates]
        )
        stores = []
        for pending, found in decisions:
            row = pending.row
            if any(doc_id_for(i) in existing or i in by_cht for i in found.candidates):
                del self._undecided[row.id]
                continue
            if found.problem is not None:
                del self._undecided[row.id]
                self._log.warning(
                    "incoming_not_recoverable", message_id=row.id, reason=found.problem
                )
                self._metrics.incoming_unrecoverable.inc()
                continue
            if found.store_as is None:
                continue  # its run is not listed yet: wait
            sender = webhook_from(row.urn)
            if sender is None or not row.text:
                # The flow's webhook call is refused too (no phone number, or no text).
                del self._undecided[row.id]
                self._log.warning(
                    "incoming_not_recoverable",
                    message_id=row.id,
                    reason="no phone number" if sender is None else "no text",
                )
                self._metrics.incoming_unrecoverable.inc()
                continue
            message = {"id": found.store_as, "from": sender, "content": row.text}
            stores.append((row, found, message))
        # Checked above for all of them at once: CHT's view is not asked again per SMS.
        outcomes = await asyncio.gather(
            *(
                # The text decides: the webhook's `from` may be the contact's first number.
                self._store.store(
                    message, now_ms=reported_ms(row), check_cht=False, match_sender=False
                )
                for row, _, message in stores
            ),
            return_exceptions=True,
        )
        failed: GatewayError | None = None
        for (row, found, _), stored in zip(stores, outcomes, strict=True):
            if isinstance(stored, StoreRefusedError):
                self._log.error("incoming_recovery_refused", message_id=row.id, error=str(stored))
                continue
            if isinstance(stored, GatewayError):
                failed = stored  # CouchDB unavailable: the SMS stays undecided, tried again
                continue
            if isinstance(stored, BaseException):
                raise stored
            del self._undecided[row.id]
            if stored.outcome == "saved":
                report.recovered += 1
                self._metrics.incoming_recovered.inc()
                self._bump("recovered")
                self._log.info(
                    "incoming_recovered",
                    doc_id=stored.doc_id,
                    message_id=row.id,
                    message_uuid=row.uuid,
                    run_uuid=found.store_as if found.store_as != row.uuid else None,
                    flow=row.flow.uuid if row.flow else None,
                    received_at=row.created_on.isoformat() if row.created_on else None,
                )
        if failed is not None:
            self._log.warning("incoming_recovery_retrying", error=str(failed))

    async def _runs_for(
        self, target: Target, ready: list[Pending], report: RoundReport
    ) -> list[Run]:
        """The CHT flows' runs since the oldest message to decide (one listing per flow)."""
        found: list[Run] = []
        oldest = min((p.row.created_on for p in ready if p.row.created_on), default=None)
        if oldest is None:
            return found
        flows = {p.row.flow.uuid for p in ready if p.row.flow is not None}
        after = oldest - timedelta(seconds=self._settings.clock_skew_s)
        for flow in sorted(flows):
            listing = self._rapidpro.runs(target, flow=flow, after=after)
            async with contextlib.aclosing(listing):
                async for page in listing:
                    report.runs_requests += 1
                    found += page
        return found

    def _bump(self, name: str) -> None:
        self.position.totals[name] = self.position.totals.get(name, 0) + 1
        self._dirty = True


def _merged(gaps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for low, high in sorted(gaps):
        if high <= low:
            continue
        if merged and low <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged
