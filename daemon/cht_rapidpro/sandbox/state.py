"""The sandbox's state: config, clock, records, scripted outcomes, faults and throttling.

Pure Python (the one network call, `Sandbox.deliver_incoming`, lives in `incoming`), so tests can
drive it in-process. Every status is a function of the sandbox clock: a message carries its whole
timeline from creation, and `advance()` moves time instead of sleeping. Faithful: broadcasts
create their messages one step after the POST (so `?broadcast=` is empty at first), courier's
error rule (retry after 5 then 10 minutes, the third error is `failed`), `sent_on`/`modified_on`
upkeep (spec §4.3-§4.4), and DRF's sliding-log throttle per scope (§1.6). The workspace has a
country (`SandboxConfig.default_country`, Kenya unless configured), as every real workspace has
one from its time zone. Simplified: one org, one channel; no loop guard, no 7-day staleness sweep,
no blocked contacts. The `v9` dialect is community RapidPro 9.0: RapidPro 9.1.99 and later report
read receipts as `read`, as the `current` dialect does.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from . import wire
from .incoming import IncomingOutcome, call_webhook
from .wire import Dialect

DEFAULT_TOKEN = "0123456789abcdef0123456789abcdef01234567"  # noqa: S105 - a public demo token
OUTGOING_STATUSES = frozenset({"queued", "wired", "sent", "delivered", "read", "errored", "failed"})
SENT_STATUSES = frozenset({"wired", "sent", "delivered", "read"})
CHANNEL = {"uuid": "5f1ad8c4-6d4c-4a7f-9d1e-5a6b7c8d9e0f", "name": "Sandbox"}
INCOMING_FLOW = {"uuid": "0b6a9f6e-2f4b-4c3e-8c9a-1d2e3f4a5b6c", "name": "CHT incoming"}
#: A flow that replies to incoming messages and sends reminders (RapidPro-originated traffic).
REMINDERS_FLOW = {"uuid": "5d2c9b1a-8e7f-4a6b-9c3d-2e1f0a9b8c7d", "name": "ANC reminders"}
#: Broadcasts and messages get ids from different ranges, so mixing them up shows in tests.
FIRST_BROADCAST_ID, FIRST_MESSAGE_ID, FIRST_RUN_ID = 1001, 500001, 9000001


def default_rates(dialect: Dialect) -> dict[str, int | None]:
    """RapidPro's default requests per hour per throttle scope (spec §1.6)."""
    if dialect == "v9":
        return {
            "v2": 2500,
            "v2.contacts": 2500,
            "v2.messages": 2500,
            "v2.broadcasts": 36000,
            "v2.runs": 2500,
        }
    return {"v2": 3600, "v2.contacts": 3600, "v2.messages": 3600, "v2.runs": 3600}


def throttle_scope(endpoint: str, dialect: Dialect) -> str:
    """The view's `throttle_scope`: broadcasts share the catch-all `v2` bucket in current."""
    if endpoint == "broadcasts":
        return "v2.broadcasts" if dialect == "v9" else "v2"
    return {"messages": "v2.messages", "contacts": "v2.contacts", "runs": "v2.runs"}.get(
        endpoint, "v2"
    )


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """How the sandbox behaves; change it at run time with `Sandbox.configure`.

    Attributes:
        tokens: API tokens that authenticate (`Authorization: Token <key>`).
        dialect: `v9` (community RapidPro 9.0) or `current` (TextIt).
        rates: requests per `throttle_window` per scope; a missing or None scope is
            unthrottled. `default_rates(dialect)` gives RapidPro's own.
        retry_after_header: send `Retry-After` with a 429.
        page_size: rows per page of a list (fixed 250 on RapidPro).
        default_country: the org's country (ISO 3166 alpha-2) for local phone numbers. Real
            workspaces derive it from their time zone; KE matches the CHT settings of the
            demo and the tests. None is a workspace whose time zone names no country (UTC):
            local numbers are then refused.
        step_seconds: time between two status changes of a message.
        retry_backoff_seconds: courier's retry unit after an `errored` (5 min, then 10 min).
        default_outcome: statuses a message goes through after `queued` unless scripted.
        webhook_timeout: total timeout of a simulated Call Webhook (15 s on RapidPro).
        replica_lag: GETs miss rows younger than this many seconds.
        retention_days: rows older than this vanish from GETs (90 days on RapidPro's archiver).
        real_time: the clock follows real time too; False means only `advance` moves it.
        seed: seed of the RNG for probabilistic faults.
    """

    tokens: frozenset[str] = frozenset({DEFAULT_TOKEN})
    dialect: Dialect = "current"
    rates: Mapping[str, int | None] = field(default_factory=dict)
    retry_after_header: bool = True
    throttle_window: float = 3600.0
    page_size: int = 250
    default_country: str | None = "KE"
    step_seconds: float = 0.2
    retry_backoff_seconds: float = 300.0
    default_outcome: tuple[str, ...] = ("wired", "sent", "delivered")
    webhook_timeout: float = 15.0
    replica_lag: float = 0.0
    retention_days: float | None = None
    real_time: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dialect not in wire.DIALECTS:
            raise ValueError(f"dialect must be one of {', '.join(wire.DIALECTS)}")
        check_outcome(self.default_outcome)
        if self.page_size < 1:
            raise ValueError("page_size must be at least 1")


def check_outcome(outcome: Sequence[str]) -> tuple[str, ...]:
    """Reject unknown statuses in a scripted outcome."""
    unknown = [s for s in outcome if s not in OUTGOING_STATUSES]
    if unknown or isinstance(outcome, str):
        raise ValueError(f"unknown message status in outcome: {unknown or outcome}")
    return tuple(outcome)


class Clock:
    """Sandbox time: wall time at start, plus real time elapsed (if `real_time`), plus `advance`."""

    def __init__(self, *, real_time: bool = True) -> None:
        self.real_time = real_time
        self._start = datetime.now(UTC)
        self._mono = time.monotonic()
        self._offset = 0.0

    def seconds(self) -> float:
        elapsed = time.monotonic() - self._mono if self.real_time else 0.0
        return elapsed + self._offset

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self.seconds())

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self._offset += seconds


@dataclass(slots=True)
class Contact:
    id: int
    uuid: str
    name: str | None
    urns: list[str]
    created_on: datetime

    def ref(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "name": self.name}


Timeline = list[tuple[datetime, str]]


@dataclass(slots=True)
class MessageRecord:
    """A message and its whole status timeline: `(when, status)`, the first being creation."""

    id: int
    uuid: str
    broadcast: int | None
    contact: Contact
    urn: str
    text: str
    timeline: Timeline
    direction: str = "out"
    flow: Mapping[str, str] | None = None
    #: Incoming: when the flow finished with it (status `P`, so not listed, until then).
    handled_on: datetime | None = None

    @property
    def created_on(self) -> datetime:
        return self.timeline[0][0]

    def listed_at(self, now: datetime) -> bool:
        """Whether the default list shows it (it leaves out incoming messages still `P`)."""
        return self.handled_on is None or self.handled_on <= now

    def state_at(self, now: datetime) -> tuple[str, datetime | None, datetime]:
        """`(status, sent_on, modified_on)` at `now`, maintained as courier does (spec §4.3)."""
        if self.direction == "in":
            handled = self.handled_on or self.created_on
            return (
                ("handled", None, handled) if handled <= now else ("queued", None, self.created_on)
            )
        status, sent_on, modified_on = self.timeline[0][1], None, self.created_on
        for when, step in self.timeline[1:]:
            if when > now:
                break
            status, modified_on = step, when
            if step in SENT_STATUSES:
                sent_on = sent_on or when  # COALESCE(sent_on, NOW())
            elif step in ("errored", "failed"):
                sent_on = None
        return status, sent_on, modified_on


def build_timeline(
    start: datetime, outcome: Sequence[str], *, step: float, backoff: float
) -> Timeline:
    """Courier's course for a message: `queued`, then `outcome` one step apart.

    After an `errored`, mailroom re-queues it `backoff` x error count later (5, then 10 min) and
    the next attempt follows a step after; a third `errored` becomes `failed` (spec §4.4).
    """
    timeline = [(start, "queued")]
    at, errors = start, 0
    for status in outcome:
        if timeline[-1][1] == "errored":
            at += timedelta(seconds=backoff * errors)
            timeline.append((at, "queued"))
        at += timedelta(seconds=step)
        if status == "errored":
            errors += 1
            if errors >= 3:
                timeline.append((at, "failed"))
                break
        timeline.append((at, status))
        if status == "failed":
            break
    return timeline


@dataclass(slots=True)
class BroadcastRecord:
    id: int
    uuid: str
    urns: list[str]
    contacts: list[Contact]
    text: dict[str, str]
    base_language: str
    created_on: datetime
    messages_on: datetime  # when mailroom has created the messages
    recipients: int
    message_ids: list[int]
    body: Any

    def status_at(self, now: datetime, dialect: Dialect) -> str:
        """v9: `queued` → `sent`; current: `pending` → `queued` → `completed` (spec §2.5)."""
        if now <= self.created_on:  # what the POST answers, whatever the step
            return "queued" if dialect == "v9" else "pending"
        if dialect == "v9":
            return "queued" if now < self.messages_on else "sent"
        if now >= self.messages_on:
            return "completed"
        halfway = self.created_on + (self.messages_on - self.created_on) / 2
        return "pending" if now < halfway else "queued"

    def progress_at(self, now: datetime, dialect: Dialect) -> tuple[int, int]:
        status = self.status_at(now, dialect)
        total = -1 if status == "pending" else self.recipients or -1  # `0 or -1`, as RapidPro
        return total, len(self.message_ids) if status == "completed" else 0


@dataclass(slots=True)
class RunRecord:
    """A flow run: started by an incoming message (or by a flow start, `start`)."""

    id: int
    uuid: str
    flow: Mapping[str, str]
    contact: Contact
    urn: str
    created_on: datetime
    modified_on: datetime
    exited_on: datetime | None
    start: str | None = None  # uuid of the flow start that created it
    responded: bool = True


class PostedBroadcast(NamedTuple):
    urns: tuple[str, ...]
    text: str
    id: int


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One API request as the sandbox answered it; `status` 0 means the connection was dropped."""

    method: str
    path: str
    query: dict[str, str]
    status: int
    at: datetime
    body: Any = None  # the JSON body of broadcast POSTs


@dataclass(slots=True)
class Fault:
    """An injected failure for matching API requests.

    Attributes:
        method, path: match (path is a suffix such as `broadcasts.json`); None matches any.
        status: answer this instead (500/502/503 get RapidPro's or nginx's text/HTML bodies, 429 a
            DRF body); None keeps the real answer (with `delay`, a slow response).
        body: override the body text.
        retry_after: `Retry-After` seconds for an injected 429 (None: no header).
        delay: seconds to wait before answering (after committing, if `commit`).
        count: how many matching requests it affects; None means all of them.
        every: affect only every n-th matching request (the n-th, 2n-th, ...).
        probability: the chance each matching request is affected (seeded RNG).
        commit: handle the request for real first (the broadcast IS created), then fail.
        drop: close the connection instead of answering.
    """

    method: str | None = None
    path: str | None = None
    status: int | None = 503
    body: str | None = None
    retry_after: int | None = None
    delay: float = 0.0
    count: int | None = 1
    probability: float | None = None
    commit: bool = False
    drop: bool = False
    every: int | None = None
    seen: int = 0  # matching requests so far (for `every`)

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.path is None or path.endswith(self.path)


class ThrottledError(Exception):
    """429: `wait` is the seconds until a request is allowed, None if it cannot be computed."""

    def __init__(self, wait: float | None) -> None:
        super().__init__(wait)
        self.wait = wait


class Sandbox:
    """A fake RapidPro workspace: what the HTTP app reads and writes, and what tests inspect."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.clock = Clock(real_time=self.config.real_time)
        self._broadcast_ids = itertools.count(FIRST_BROADCAST_ID)
        self._message_ids = itertools.count(FIRST_MESSAGE_ID)
        self._run_ids = itertools.count(FIRST_RUN_ID)
        self.reset()

    def reset(self) -> None:
        """Forget everything but the config and the clock; ids keep counting up."""
        self.broadcasts: list[BroadcastRecord] = []
        self.messages: list[MessageRecord] = []  # in the order they were made
        self.runs: list[RunRecord] = []
        # Indexes (RapidPro's own are database indexes): by creation, id, uuid, broadcast.
        self._ordered: list[MessageRecord] = []
        self._order_keys: list[tuple[datetime, int]] = []
        self._by_id: dict[int, MessageRecord] = {}
        self._by_uuid: dict[str, MessageRecord] = {}
        self._by_broadcast: dict[int, list[MessageRecord]] = {}
        self._contacts_by_urn: dict[str, Contact] = {}
        self.contacts: list[Contact] = []
        self.requests: list[RequestRecord] = []
        self.incoming: list[IncomingOutcome] = []
        self.faults: list[Fault] = []
        self.scripts: dict[str, tuple[str, ...] | None] = {}
        self._throttle_logs: dict[str, deque[float]] = {}
        self._rng = random.Random(self.config.seed)  # noqa: S311 - fault dice, not crypto

    def configure(self, **changes: Any) -> SandboxConfig:
        """Replace config fields (e.g. `rates`, `dialect`); throttle logs are kept."""
        if "tokens" in changes:
            changes["tokens"] = frozenset(changes["tokens"])
        if "default_outcome" in changes:
            changes["default_outcome"] = check_outcome(changes["default_outcome"])
        self.config = dataclasses.replace(self.config, **changes)
        self.clock.real_time = self.config.real_time
        return self.config

    # --- time ---

    def now(self) -> datetime:
        return self.clock.now()

    def advance(self, seconds: float) -> None:
        """Move the sandbox clock: statuses progress and throttle logs age as if time passed."""
        self.clock.advance(seconds)

    # --- test controls ---

    def script(self, urn: str, outcome: Sequence[str] | None) -> None:
        """Set the statuses after `queued` for messages to `urn`; None: no message is created."""
        key = wire.normalize_urn(urn, self.config.default_country) or urn
        self.scripts[key] = None if outcome is None else check_outcome(outcome)

    def add_fault(
        self,
        *,
        method: str | None = None,
        path: str | None = None,
        status: int | None = 503,
        body: str | None = None,
        retry_after: int | None = None,
        delay: float = 0.0,
        count: int | None = 1,
        probability: float | None = None,
        commit: bool = False,
        drop: bool = False,
        every: int | None = None,
    ) -> Fault:
        """Inject a failure for the next matching request(s); see `Fault`."""
        fault = Fault(
            method, path, status, body, retry_after, delay, count, probability, commit, drop, every
        )
        if fault.status is None and not fault.drop and not fault.delay:
            raise ValueError("a fault needs a status, a delay or drop")
        if every is not None and every < 1:
            raise ValueError("every must be at least 1")
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def take_fault(self, method: str, path: str) -> Fault | None:
        """The fault for this request, if any, counting it against the fault's `count`."""
        for fault in self.faults:
            if not fault.matches(method, path):
                continue
            if fault.every is not None:
                fault.seen += 1
                if fault.seen % fault.every:
                    continue
            if fault.probability is not None and self._rng.random() >= fault.probability:
                continue
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
            return fault
        return None

    # --- requests ---

    def check_throttle(self, scope: str) -> None:
        """DRF `SimpleRateThrottle`: a sliding log per scope; only allowed requests are logged.

        Raises:
            ThrottledError: with DRF's `wait()`.
        """
        rate = self.config.rates.get(scope)
        if rate is None:
            return
        now, window = self.clock.seconds(), self.config.throttle_window
        log = self._throttle_logs.setdefault(scope, deque())
        while log and log[0] <= now - window:
            log.popleft()
        if len(log) < rate:
            log.append(now)
            return
        remaining = window - (now - log[0]) if log else window
        available = rate - len(log) + 1
        raise ThrottledError(remaining / available if available > 0 else None)

    def record_request(
        self, method: str, path: str, query: Mapping[str, str], status: int, body: Any = None
    ) -> None:
        self.requests.append(RequestRecord(method, path, dict(query), status, self.now(), body))

    def count_requests(self, method: str | None = None, path_suffix: str = "") -> int:
        """How many API requests matched `method` (None: any) and ended with `path_suffix`."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method.upper()) and r.path.endswith(path_suffix)
        )

    def posted_broadcasts(self) -> list[PostedBroadcast]:
        """`(urns, text, id)` of every broadcast created, including commit-then-fail ones."""
        return [
            PostedBroadcast(tuple(b.urns), b.text[b.base_language], b.id) for b in self.broadcasts
        ]

    # --- contacts, broadcasts, messages ---

    def find_contact(self, ref: str) -> Contact | None:
        """By UUID, or by URN as `ContactField` also does."""
        urn = wire.normalize_urn(ref, self.config.default_country)
        if urn is not None and urn in self._contacts_by_urn:
            return self._contacts_by_urn[urn]
        for contact in self.contacts:
            if contact.uuid == ref:
                return contact
        return None

    def contact_for(self, urn: str) -> Contact:
        """The contact owning `urn`, created (nameless) if new, as mailroom does."""
        contact = self._contacts_by_urn.get(urn) or self.find_contact(urn)
        if contact is None:
            contact = Contact(len(self.contacts) + 1, str(uuid.uuid4()), None, [urn], self.now())
            self.contacts.append(contact)
            self._contacts_by_urn[urn] = contact
        return contact

    # --- the message store ---

    def _index(self, message: MessageRecord) -> None:
        self._by_id[message.id] = message
        self._by_uuid[message.uuid] = message
        if message.broadcast is not None:
            self._by_broadcast.setdefault(message.broadcast, []).append(message)

    def store_message(self, message: MessageRecord) -> None:
        """Keep a message (in creation order, and in the id, uuid and broadcast indexes)."""
        self.messages.append(message)
        key = (message.created_on, message.id)
        if not self._order_keys or key >= self._order_keys[-1]:
            self._order_keys.append(key)
            self._ordered.append(message)
        else:
            slot = bisect.bisect_left(self._order_keys, key)
            self._order_keys.insert(slot, key)
            self._ordered.insert(slot, message)
        self._index(message)

    def add_messages(self, messages: Iterable[MessageRecord]) -> None:
        """Keep many messages at once (a workspace's history): one sort, not one insert each."""
        added = list(messages)
        self.messages.extend(added)
        self._ordered.extend(added)
        self._ordered.sort(key=lambda m: (m.created_on, m.id))
        self._order_keys = [(m.created_on, m.id) for m in self._ordered]
        for message in added:
            self._index(message)

    def next_message_id(self) -> int:
        return next(self._message_ids)

    def next_broadcast_id(self) -> int:
        return next(self._broadcast_ids)

    def message_by_id(self, message_id: int) -> MessageRecord | None:
        return self._by_id.get(message_id)

    def message_by_uuid(self, message_uuid: str) -> MessageRecord | None:
        return self._by_uuid.get(message_uuid)

    def broadcast_messages(self, broadcast: int) -> list[MessageRecord]:
        return list(self._by_broadcast.get(broadcast, ()))

    def messages_between(
        self, after: datetime | None, before: datetime | None
    ) -> list[MessageRecord]:
        """Messages created in [after, before] (inclusive, as RapidPro's filters), oldest first."""
        low = 0 if after is None else bisect.bisect_left(self._order_keys, (after, -1))
        high = (
            len(self._order_keys)
            if before is None
            else bisect.bisect_right(self._order_keys, (before, 1 << 62))
        )
        return self._ordered[low:high]

    def validate_broadcast(self, body: Any) -> wire.BroadcastRequest:
        def find(ref: str) -> str | None:
            contact = self.find_contact(ref)
            return None if contact is None else contact.uuid

        return wire.validate_broadcast(
            body,
            dialect=self.config.dialect,
            country=self.config.default_country,
            find_contact=find,
        )

    def create_broadcast(self, request: wire.BroadcastRequest, body: Any = None) -> BroadcastRecord:
        """Store a broadcast and the messages mailroom will create one step later."""
        now = self.now()
        messages_on = now + timedelta(seconds=self.config.step_seconds)
        recipients: dict[str, tuple[Contact, str]] = {}
        for urn in request.urns:
            contact = self.contact_for(urn)
            recipients.setdefault(contact.uuid, (contact, urn))
        contacts = [c for c in self.contacts if c.uuid in request.contacts]
        for contact in contacts:
            recipients.setdefault(contact.uuid, (contact, contact.urns[0]))
        record = BroadcastRecord(
            id=next(self._broadcast_ids),
            uuid=str(uuid.uuid4()),
            urns=list(request.urns),
            contacts=contacts,
            text=request.text,
            base_language=request.base_language,
            created_on=now,
            messages_on=messages_on,
            recipients=len(recipients),
            message_ids=[],
            body=body,
        )
        for contact, urn in recipients.values():
            message = self._broadcast_message(record, contact, urn)
            if message is not None:
                record.message_ids.append(message.id)
                self.store_message(message)
        self.broadcasts.append(record)
        return record

    def _broadcast_message(
        self, broadcast: BroadcastRecord, contact: Contact, urn: str
    ) -> MessageRecord | None:
        outcome = self.scripts.get(urn, self.config.default_outcome)
        context = {
            "contact": {
                "__default__": contact.name,
                "name": contact.name,
                "uuid": contact.uuid,
                "first_name": (contact.name or "").split(" ")[0] or None,
            },
            "urns": {urn.partition(":")[0]: urn},
        }
        text = wire.render_template(broadcast.text[broadcast.base_language], context)
        if outcome is None or not text.strip():
            return None  # scripted "no message", or an empty evaluated text (spec §2.4)
        timeline = build_timeline(
            broadcast.messages_on,
            outcome,
            step=self.config.step_seconds,
            backoff=self.config.retry_backoff_seconds,
        )
        return MessageRecord(
            next(self._message_ids), str(uuid.uuid4()), broadcast.id, contact, urn, text, timeline
        )

    def add_incoming_message(
        self,
        urn: str,
        text: str,
        *,
        flow: Mapping[str, str] | None = INCOMING_FLOW,
        handled: bool = True,
        created_on: datetime | None = None,
    ) -> MessageRecord:
        """An incoming SMS: listed with `direction: in` once handled (by `flow`, or the inbox).

        `created_on` (default: now) lets a test make one that RapidPro took long to handle.
        """
        now = created_on or self.now()
        message = MessageRecord(
            next(self._message_ids),
            str(uuid.uuid4()),
            None,
            self.contact_for(urn),
            urn,
            text,
            [(now, "handled")],
            "in",
            dict(flow) if flow else None,
            handled_on=now if handled else now + timedelta(days=36500),
        )
        self.store_message(message)
        return message

    def handle_incoming(self, message: MessageRecord, run_uuid: str | None = None) -> RunRecord:
        """The flow has run for `message` (its webhook call over): it is listed from now, and
        its run is written, as mailroom commits both at the end of the session."""
        now = self.now()
        message.handled_on = now
        run = RunRecord(
            id=next(self._run_ids),
            uuid=run_uuid or str(uuid.uuid4()),
            flow=dict(message.flow or INCOMING_FLOW),
            contact=message.contact,
            urn=message.urn,
            created_on=now,
            modified_on=now,
            exited_on=now,
        )
        self.runs.append(run)
        return run

    def send_from_rapidpro(
        self,
        urns: Sequence[str],
        text: str,
        *,
        flow: Mapping[str, str] | None = None,
        broadcast: bool = False,
        outcome: Sequence[str] | None = None,
    ) -> list[MessageRecord]:
        """Messages RapidPro sends itself, one per URN (created now, statuses as scripted):
        a flow's replies or a campaign event (`flow`, no broadcast), or a broadcast made in
        RapidPro's UI or by another API client (`broadcast=True`, listed in /broadcasts too)."""
        now = self.now()
        record: BroadcastRecord | None = None
        if broadcast:
            record = BroadcastRecord(
                id=next(self._broadcast_ids),
                uuid=str(uuid.uuid4()),
                urns=list(urns),
                contacts=[],
                text={wire.DEFAULT_LANGUAGE: text},
                base_language=wire.DEFAULT_LANGUAGE,
                created_on=now,
                messages_on=now,
                recipients=len(urns),
                message_ids=[],
                body=None,
            )
            self.broadcasts.append(record)
        made = []
        for urn in urns:
            steps = (
                tuple(outcome)
                if outcome is not None
                else self.scripts.get(urn, self.config.default_outcome)
            )
            if steps is None:
                continue  # scripted: no message for this URN
            timeline = build_timeline(
                now,
                steps,
                step=self.config.step_seconds,
                backoff=self.config.retry_backoff_seconds,
            )
            message = MessageRecord(
                next(self._message_ids),
                str(uuid.uuid4()),
                record.id if record else None,
                self.contact_for(urn),
                urn,
                text,
                timeline,
                "out",
                dict(flow) if flow else None,
            )
            if record is not None:
                record.message_ids.append(message.id)
            self.store_message(message)
            made.append(message)
        return made

    def visible(self, created_on: datetime, now: datetime) -> bool:
        """Whether a GET sees a row: created, past the replica lag, not yet archived."""
        if created_on > now - timedelta(seconds=self.config.replica_lag):
            return False
        days = self.config.retention_days
        return days is None or created_on >= now - timedelta(days=days)

    def listed(self, message: MessageRecord, now: datetime) -> bool:
        """`visible`, and not an incoming message still waiting for its flow (`P`)."""
        return message.listed_at(now) and self.visible(message.created_on, now)

    # --- JSON ---

    def broadcast_json(
        self, record: BroadcastRecord, now: datetime | None = None
    ) -> dict[str, Any]:
        """The broadcast read representation of the current dialect (spec §2.2)."""
        now, dialect = now or self.now(), self.config.dialect
        total, started = record.progress_at(now, dialect)
        values = {
            "id": record.id,
            "uuid": record.uuid,
            "status": record.status_at(now, dialect),
            "progress": {"total": total, "started": started},
            "urns": list(record.urns),
            "contacts": [c.ref() for c in record.contacts],
            "groups": [],
            "text": dict(record.text),
            "attachments": {lang: [] for lang in record.text},
            "quick_replies": {lang: [] for lang in record.text},
            "base_language": record.base_language,
            "created_on": wire.iso(record.created_on),
        }
        return wire.shape(wire.BROADCAST_FIELDS[dialect], values)

    def message_json(self, record: MessageRecord, now: datetime | None = None) -> dict[str, Any]:
        """A message object of the current dialect (spec §4.3)."""
        status, sent_on, modified_on = record.state_at(now or self.now())
        if status == "read" and self.config.dialect == "v9":
            status = "delivered"  # v9 has no read receipts
        values = {
            "id": record.id,
            "uuid": record.uuid,
            "broadcast": record.broadcast,
            "contact": record.contact.ref(),
            "urn": record.urn,
            "channel": dict(CHANNEL),
            "direction": record.direction,
            "type": "text",
            "status": status,
            "archived": False,
            "visibility": "visible",
            "text": record.text,
            "labels": [],
            "flow": dict(record.flow) if record.flow else None,
            "attachments": [],
            "quick_replies": [],
            "created_on": wire.iso(record.created_on),
            "sent_on": wire.iso(sent_on) if sent_on else None,
            "modified_on": wire.iso(modified_on),
            "media": None,
        }
        return wire.shape(wire.MESSAGE_FIELDS[self.config.dialect], values)

    def contact_json(self, contact: Contact) -> dict[str, Any]:
        data: dict[str, Any] = {"uuid": contact.uuid, "name": contact.name}
        if self.config.dialect == "current":
            data["status"] = "active"
        data.update(
            language=None,
            urns=list(contact.urns),
            groups=[],
            fields={},
            flow=None,
            created_on=wire.iso(contact.created_on),
            modified_on=wire.iso(contact.created_on),
            last_seen_on=None,
            blocked=False,
            stopped=False,
        )
        return data

    def snapshot(self) -> dict[str, Any]:
        """Everything a demo or an out-of-process test wants to see (`GET /_sandbox/state`)."""
        now = self.now()
        config = dataclasses.asdict(self.config)
        config.pop("tokens")
        routes = Counter(f"{r.method} {r.path}" for r in self.requests)
        return {
            "now": wire.iso(now),
            "config": config,
            "broadcasts": [
                {**self.broadcast_json(b, now), "message_ids": b.message_ids, "body": b.body}
                for b in self.broadcasts
            ],
            "messages": [self.message_json(m, now) for m in self.messages if m.created_on <= now],
            "requests": {
                "total": len(self.requests),
                "by_route": dict(routes),
                "by_status": {
                    str(k): v for k, v in Counter(r.status for r in self.requests).items()
                },
                "last": [
                    {**dataclasses.asdict(r), "at": wire.iso(r.at)} for r in self.requests[-100:]
                ],
            },
            "faults": [dataclasses.asdict(f) for f in self.faults],
            "scripts": {urn: list(o) if o is not None else None for urn, o in self.scripts.items()},
            "incoming": [o.as_json() for o in self.incoming],
        }

    def run_json(self, run: RunRecord) -> dict[str, Any]:
        """A run as `FlowRunReadSerializer` writes it (path and results left empty)."""
        return {
            "id": run.id,
            "uuid": run.uuid,
            "flow": dict(run.flow),
            "contact": {**run.contact.ref(), "urn": run.urn},
            "start": {"uuid": run.start} if run.start else None,
            "responded": run.responded,
            "path": [],
            "values": {},
            "created_on": wire.iso(run.created_on),
            "modified_on": wire.iso(run.modified_on),
            "exited_on": wire.iso(run.exited_on) if run.exited_on else None,
            "exit_type": "completed" if run.exited_on else None,
        }

    async def deliver_incoming(
        self,
        url: str,
        *,
        from_: str,
        text: str,
        headers: Mapping[str, str] | None = None,
        run_uuid: str | None = None,
        flow: Mapping[str, str] = INCOMING_FLOW,
        body: str = "cht",
    ) -> IncomingOutcome:
        """Simulate the CHT flow's Call Webhook for an SMS from `from_` (spec §6), and record it.

        The SMS is created (not listed yet, `P`), the flow calls the webhook, and then the SMS
        is listed (`direction: in`, `handled`, its `flow`) and its run written, as RapidPro
        does whatever the webhook answered. `body` is the flow's: `cht` (CHT's documented body,
        `id` = the run's uuid) or `message` (the extended body: `id` = the message's uuid, and
        `sent_timestamp` = its `created_on`).
        """
        message = self.add_incoming_message(f"tel:{from_}", text, flow=flow, handled=False)
        run_uuid = run_uuid or str(uuid.uuid4())
        if body == "message":
            payload = {
                "content": text,
                "from": from_,
                "id": message.uuid,
                "sent_timestamp": wire.iso(message.created_on),
            }
        else:
            payload = {"content": text, "from": from_, "id": run_uuid}
        outcome = await call_webhook(
            url,
            body=payload,
            headers=headers or {},
            dialect=self.config.dialect,
            timeout_s=self.config.webhook_timeout,
        )
        self.handle_incoming(message, run_uuid)
        self.incoming.append(outcome)
        return outcome


def throttle_detail(wait: float | None) -> tuple[str, int | None]:
    """DRF's 429 detail and `Retry-After` seconds (`ceil`), or no header when wait is unknown."""
    if wait is None:
        return "Request was throttled.", None
    seconds = math.ceil(wait)
    unit = "second" if seconds == 1 else "seconds"
    return f"Request was throttled. Expected available in {seconds} {unit}.", seconds
