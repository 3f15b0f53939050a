"""`cht-rapidpro status`: messages by state, the oldest unsent one, feed checkpoints, RapidPro's
message log (mirrored and recovered messages), the daemon.

Counts come from CHT's own `medic/messages_by_state` view when the db has it (what CHT counts),
else from a streamed scan that applies the same rules to every document. Only numbers are
shown: never message text or phone numbers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

from ..cht.state import SENDABLE_STATES, js_truthy, parse_iso
from ..config import Settings
from ..couch.client import CouchClient, JsonDict
from ..messagelog import POSITION_ID
from ..replicas import PREFIX as REPLICA_PREFIX
from ..tracking import MIRROR_REF_PREFIX
from .common import (
    EX_OK,
    format_age,
    get_listener,
    listener_url,
    now_utc,
    open_couch,
    require_db,
)

VIEW = ("medic", "messages_by_state")
#: The view's extra rows for the send loop's query; not a state of their own.
PENDING_OR_FORWARDED = "pending-or-forwarded"
VIEW_PAGE = 2000
SCAN_PAGE = 500
#: Counting changes behind a checkpoint stops here (reported as "more than").
PENDING_CHANGES_CAP = 10_000
CHANGES_PAGE = 1000
#: A gauge the daemon may export; read when present.
BUDGET_METRIC = "chtrp_rapidpro_budget_remaining"
NO_STATE = "(no state)"


@dataclass(slots=True)
class MessageCounts:
    """Messages by task state, as CHT's `messages_by_state` view counts them (spec §2.1)."""

    method: str  # "view" | "scan"
    by_state: dict[str, int] = field(default_factory=dict)
    oldest_unsent_due_ms: float | None = None  # among pending / forwarded-to-gateway
    oldest_unsent_doc_id: str | None = None
    unsent_without_due: int = 0


@dataclass(slots=True)
class Checkpoint:
    instance: str
    seq: str | None  # shortened for display
    saved_at: str | None
    age_s: float | None
    caught_up: bool | None
    pending_changes: int | None
    pending_capped: bool = False
    replica: str | None = None  # what its presence document says
    configured: bool = False  # the instance these settings name (CHT_RAPIDPRO_INSTANCE)


#: Mirrored documents are counted up to this many.
MIRRORED_COUNT_CAP = 1_000_000


@dataclass(slots=True)
class MessageLogState:
    """RapidPro's message log as the follower left it (`_local/cht-rapidpro-log`)."""

    mirror: bool
    flows: list[str]
    incoming_id: str
    saved_at: str | None = None
    saved_by: str | None = None
    age_s: float | None = None  # since the position was saved
    behind_s: float | None = None  # newest message read, behind the save
    gaps: int = 0
    mirrored_docs: int = 0  # documents rapidpro-msg:* in CouchDB
    mirrored_capped: bool = False
    counted: dict[str, int] = field(default_factory=dict)  # by the followers, all time


async def read_message_log(couch: CouchClient, settings: Settings) -> MessageLogState:
    state = MessageLogState(
        mirror=settings.mirror_outgoing,
        flows=list(settings.incoming_flows),
        incoming_id=settings.incoming_id,
    )
    doc = await couch.get(f"_local/{POSITION_ID}")
    if doc:
        saved = parse_iso(doc.get("saved_at"))
        top = parse_iso(doc.get("top"))
        state.saved_at = saved.isoformat() if saved else None
        state.saved_by = doc.get("saved_by") if isinstance(doc.get("saved_by"), str) else None
        state.age_s = (now_utc() - saved).total_seconds() if saved else None
        state.behind_s = (saved - top).total_seconds() if saved and top else None
        state.gaps = len(doc.get("gaps") or [])
        totals = doc.get("totals")
        if isinstance(totals, dict):
            state.counted = {k: v for k, v in totals.items() if isinstance(v, int)}
    state.mirrored_docs = await couch.count_prefix(MIRROR_REF_PREFIX, cap=MIRRORED_COUNT_CAP)
    state.mirrored_capped = state.mirrored_docs >= MIRRORED_COUNT_CAP
    return state


@dataclass(slots=True)
class DaemonState:
    url: str | None
    running: bool
    health: str | None = None
    problems: list[str] = field(default_factory=list)
    in_flight: float | None = None
    send_queue: float | None = None
    mirrored: float | None = None  # since the daemon started
    recovered: float | None = None
    budget_left: dict[str, float] | None = None
    note: str | None = None


# -- counting ---------------------------------------------------------------------------------


def _due_ms(task: JsonDict, doc: JsonDict) -> float | None:
    """The view's `due`: task.due || task.timestamp || doc.reported_date, strings parsed."""
    due: Any = None
    for candidate in (task.get("due"), task.get("timestamp"), doc.get("reported_date")):
        if js_truthy(candidate):
            due = candidate
            break
    if isinstance(due, str):
        moment = parse_iso(due)
        return None if moment is None else moment.timestamp() * 1000
    if isinstance(due, int | float) and not isinstance(due, bool):
        return float(due)
    return None


def _emitted(doc: JsonDict) -> list[tuple[str, float | None]]:
    """(state, due) of every row CHT's `messages_by_state` map emits for `doc`."""
    rows: list[tuple[str, float | None]] = []
    for task_list in ("tasks", "scheduled_tasks"):
        tasks = doc.get(task_list)
        if not isinstance(tasks, list):
            continue
        for task in tasks:
            if not isinstance(task, dict):
                continue
            state = task.get("state")
            key = state if isinstance(state, str) else NO_STATE
            due = _due_ms(task, doc)
            messages = task.get("messages")
            if not js_truthy(messages):
                rows.append((key, due))
                continue
            if not isinstance(messages, list):
                continue
            for message in messages:
                if isinstance(message, dict) and all(
                    js_truthy(message.get(name)) for name in ("uuid", "to", "message")
                ):
                    rows.append((key, due))
    return rows


def _tally(counts: MessageCounts, state: str, due: float | None, doc_id: Any) -> None:
    counts.by_state[state] = counts.by_state.get(state, 0) + 1
    if state in SENDABLE_STATES:
        if due is None:
            counts.unsent_without_due += 1
        elif counts.oldest_unsent_due_ms is None or due < counts.oldest_unsent_due_ms:
            counts.oldest_unsent_due_ms = due
            counts.oldest_unsent_doc_id = doc_id if isinstance(doc_id, str) else None


async def _view_pages(couch: CouchClient) -> AsyncIterator[list[JsonDict]]:
    """Every row of the view, a page at a time.

    Pages continue from the last key with `skip` over the rows of that key already read
    (CouchDB's own advice), so a key shared by many rows is neither lost nor read twice.
    """
    startkey: Any = None
    started = False
    skip = 0
    while True:
        params: dict[str, Any] = {"limit": VIEW_PAGE, "reduce": False}
        if started:
            params["startkey"] = startkey
            params["skip"] = skip
        rows = await couch.view(*VIEW, **params)
        if rows:
            yield rows
        if len(rows) < VIEW_PAGE:
            return
        last = rows[-1].get("key")
        if started and last == startkey:
            skip += len(rows)
        else:
            run = 0
            for row in reversed(rows):
                if row.get("key") != last:
                    break
                run += 1
            skip = run
        startkey, started = last, True


async def count_messages(couch: CouchClient) -> MessageCounts:
    if await couch.has_view(*VIEW):
        counts = MessageCounts("view")
        async for rows in _view_pages(couch):
            for row in rows:
                key = row.get("key")
                if not isinstance(key, list) or not key:
                    continue
                state = key[0] if isinstance(key[0], str) else NO_STATE
                if state == PENDING_OR_FORWARDED:
                    continue
                due = key[1] if len(key) > 1 else None
                numeric = float(due) if isinstance(due, int | float) else None
                _tally(counts, state, numeric, row.get("id"))
        return counts
    counts = MessageCounts("scan")
    async for page in couch.scan_docs(page_size=SCAN_PAGE):
        for doc in page:
            for state, due in _emitted(doc):
                _tally(counts, state, due, doc.get("_id"))
    return counts


# -- checkpoints ------------------------------------------------------------------------------


def _short_seq(seq: Any) -> str | None:
    if seq is None:
        return None
    text = seq if isinstance(seq, str) else json.dumps(seq)
    return text if len(text) <= 24 else text[:20] + "…"


async def pending_changes(couch: CouchClient, since: Any) -> tuple[int, bool]:
    """Documents changed after `since`, and whether the count stopped at the cap.

    Sequences are opaque: on CouchDB 3 one position has many spellings (`update_seq` and a
    feed's `last_seq` for the same position are different strings), so a checkpoint is never
    compared with `update_seq`; the feed is asked instead. CouchDB answers in one request: a
    one-row page and `pending`, the changes left after it, summed over the shards. That is
    exact on a single node; on a cluster a shard whose copy named in the checkpoint is not
    available is counted on another copy from an earlier safe position, so the figure is an
    upper bound there. A server without `pending` (pouchdb-server) is counted page by page, up
    to PENDING_CHANGES_CAP.
    """
    page = await couch.changes(since, limit=1, heartbeat_s=10.0, longpoll=False, include_docs=False)
    if page.pending is not None:
        return len(page.results) + page.pending, False
    count = len(page.results)
    if not page.results or page.last_seq is None:
        return count, False
    since = page.last_seq
    while count < PENDING_CHANGES_CAP:
        page = await couch.changes(
            since, limit=CHANGES_PAGE, heartbeat_s=10.0, longpoll=False, include_docs=False
        )
        count += len(page.results)
        if len(page.results) < CHANGES_PAGE or page.last_seq is None:
            return count, False
        since = page.last_seq
    return count, True


async def read_checkpoints(couch: CouchClient, settings: Settings) -> list[Checkpoint]:
    replicas: dict[str, JsonDict] = {}
    for presence in await couch.docs_with_prefix(REPLICA_PREFIX):
        instance = presence.get("instance")
        if isinstance(instance, str):
            replicas[instance] = presence
    instances = [settings.instance, *sorted(set(replicas) - {settings.instance})]
    now = now_utc()
    found: list[Checkpoint] = []
    for instance in instances:
        doc = await couch.get(f"_local/cht-rapidpro.{instance}")
        seq = doc.get("seq") if doc else None
        saved = parse_iso(doc.get("saved_at")) if doc else None
        replica = _replica_text(replicas.get(instance), now)
        if seq is None:
            found.append(
                Checkpoint(
                    instance,
                    None,
                    None,
                    None,
                    None,
                    None,
                    replica=replica,
                    configured=instance == settings.instance,
                )
            )
            continue
        behind, capped = await pending_changes(couch, seq)
        found.append(
            Checkpoint(
                instance=instance,
                seq=_short_seq(seq),
                saved_at=saved.isoformat() if saved else None,
                age_s=(now - saved).total_seconds() if saved else None,
                caught_up=behind == 0,
                pending_changes=behind,
                pending_capped=capped,
                replica=replica,
                configured=instance == settings.instance,
            )
        )
    return found


def _replica_text(doc: JsonDict | None, now: datetime) -> str | None:
    if doc is None:
        return None
    seen = parse_iso(doc.get("seen_at"))
    ago = f"{format_age((now - seen).total_seconds())} ago" if seen else "at an unknown time"
    return f"stopped {ago}" if doc.get("stopped") else f"announced itself {ago}"


# -- the running daemon -----------------------------------------------------------------------


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


async def daemon_state(settings: Settings) -> DaemonState:
    base = listener_url(settings)
    if base is None:
        return DaemonState(None, False, note="CHT_RAPIDPRO_PORT is 0: no fixed address to ask")
    health = await get_listener(base, "/healthz")
    body = health.json()
    if health.status is None or not isinstance(body, dict):
        return DaemonState(base, False, note=f"no daemon answers at {base}")
    problems = body.get("problems")
    state = DaemonState(
        base,
        True,
        health=str(body.get("status")),
        problems=[str(p) for p in problems] if isinstance(problems, list) else [],
    )
    metrics = await get_listener(base, "/metrics")
    if metrics.status != 200:
        state.note = f"/metrics answered {metrics.status or metrics.error}"
        return state
    try:
        samples = _samples(metrics.body)
    except ValueError:
        state.note = "/metrics is not in Prometheus' text format"
        return state
    state.in_flight = _first(samples, "chtrp_in_flight_messages")
    state.send_queue = _first(samples, "chtrp_send_queue_documents")
    state.mirrored = _first(samples, "chtrp_messages_mirrored_total")
    state.recovered = _first(samples, "chtrp_incoming_recovered_total")
    budget = samples.get(BUDGET_METRIC)
    if budget:
        state.budget_left = {labels.get("scope", "?"): value for labels, value in budget}
    else:
        state.note = (
            f"RapidPro budget left: not exported by this daemon's /metrics (no {BUDGET_METRIC}); "
            f"limits {settings.broadcasts_per_hour or 'none'}/h broadcasts, "
            f"{settings.messages_per_hour or 'none'}/h messages"
        )
    return state


def _first(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float | None:
    values = samples.get(name)
    return values[0][1] if values else None


# -- the report -------------------------------------------------------------------------------


@dataclass(slots=True)
class StatusReport:
    database: str
    doc_count: int | None
    update_seq: str | None
    messages: MessageCounts
    checkpoints: list[Checkpoint]
    daemon: DaemonState
    message_log: MessageLogState

    def oldest_unsent_age_s(self) -> float | None:
        due = self.messages.oldest_unsent_due_ms
        return None if due is None else now_utc().timestamp() - due / 1000

    def as_json(self) -> dict[str, Any]:
        report = asdict(self)
        report["messages"]["oldest_unsent_age_s"] = self.oldest_unsent_age_s()
        return report


async def collect(settings: Settings) -> StatusReport:
    async with open_couch(settings) as couch:
        info = await require_db(couch)
        update_seq = info.get("update_seq")
        counts = await count_messages(couch)
        checkpoints = await read_checkpoints(couch, settings)
        message_log = await read_message_log(couch, settings)
    daemon = await daemon_state(settings)
    doc_count = info.get("doc_count")
    return StatusReport(
        database=settings.couch.redacted,
        doc_count=doc_count if isinstance(doc_count, int) else None,
        update_seq=_short_seq(update_seq),
        messages=counts,
        checkpoints=checkpoints,
        daemon=daemon,
        message_log=message_log,
    )


def _state_order(state: str) -> tuple[int, str]:
    order = [
        "scheduled",
        "pending",
        "forwarded-to-gateway",
        "received-by-gateway",
        "forwarded-by-gateway",
        "sent",
        "delivered",
        "failed",
    ]
    return (order.index(state), state) if state in order else (len(order), state)


def render(report: StatusReport) -> str:
    lines = [f"database     {report.database}: {report.doc_count} documents"]
    counts = report.messages
    how = (
        "CHT's view medic/messages_by_state"
        if counts.method == "view"
        else "a scan of every document (no CHT views in this db)"
    )
    lines.append(f"messages     by state, from {how}:")
    if not counts.by_state:
        lines.append("               (none)")
    for state in sorted(counts.by_state, key=_state_order):
        lines.append(f"               {state:<22}{counts.by_state[state]:>8}")
    age = report.oldest_unsent_age_s()
    if age is None:
        oldest = "none" if not counts.unsent_without_due else "no due date known"
    else:
        oldest = f"{format_age(age)} (pending or forwarded-to-gateway"
        if counts.oldest_unsent_doc_id:
            oldest += f", document {counts.oldest_unsent_doc_id}"
        oldest += ")"
    if counts.unsent_without_due:
        oldest += f"; {counts.unsent_without_due} without a parseable due date"
    lines.append(f"oldest unsent {oldest}")
    for number, point in enumerate(report.checkpoints):
        label = "checkpoint   " if number == 0 else "             "
        if point.seq is None:
            text = "no checkpoint saved"
        elif point.caught_up:
            text = "caught up with the database"
        else:
            more = "more than " if point.pending_capped else ""
            text = f"{more}{point.pending_changes} changed documents behind"
        if point.age_s is not None:
            text += f", saved {format_age(point.age_s)} ago"
        if point.replica:
            text += f" (replica {point.replica})"
        name = f"{point.instance} (CHT_RAPIDPRO_INSTANCE)" if point.configured else point.instance
        lines.append(f"{label}{name}: {text}")
    lines += _render_message_log(report.message_log)
    daemon = report.daemon
    if not daemon.running:
        lines.append(f"daemon       not running ({daemon.note})")
    else:
        text = f"{daemon.url}: {daemon.health}"
        if daemon.problems:
            text += ": " + "; ".join(daemon.problems)
        lines.append(f"daemon       {text}")
        if daemon.in_flight is not None or daemon.send_queue is not None:
            lines.append(
                f"             {_num(daemon.in_flight)} messages tracked in flight, "
                f"{_num(daemon.send_queue)} documents waiting to be sent"
            )
        if daemon.mirrored is not None or daemon.recovered is not None:
            lines.append(
                f"             since it started: {_num(daemon.mirrored)} messages mirrored, "
                f"{_num(daemon.recovered)} incoming SMS recovered"
            )
        if daemon.budget_left is not None:
            left = ", ".join(
                f"{scope} {_num(v)}" for scope, v in sorted(daemon.budget_left.items())
            )
            lines.append(f"             RapidPro budget left this hour: {left}")
        if daemon.note:
            lines.append(f"             {daemon.note}")
    return "\n".join(lines)


def _render_message_log(log: MessageLogState) -> list[str]:
    flows = len(log.flows)
    recovery = (
        f"recovery for {flows} flow{'s' if flows != 1 else ''} (webhook ids: {log.incoming_id})"
        if flows
        else "recovery off"
    )
    lines = [f"rapidpro log mirroring {'on' if log.mirror else 'off'}, {recovery}"]
    if log.saved_at is None:
        lines.append("             no position saved yet")
    else:
        text = f"position saved {format_age(log.age_s or 0)} ago"
        if log.saved_by:
            text += f" by {log.saved_by}"
        if log.behind_s is not None and (log.mirror or flows):
            text += f", {format_age(log.behind_s)} behind RapidPro's newest message then"
        if log.gaps:
            text += f"; {log.gaps} stretch{'es' if log.gaps != 1 else ''} still to read"
        lines.append(f"             {text}")
    more = "more than " if log.mirrored_capped else ""
    lines.append(
        f"             in CouchDB: {more}{log.mirrored_docs} mirrored messages; counted by the "
        f"followers: {log.counted.get('mirrored', 0)} mirrored, "
        f"{log.counted.get('recovered', 0)} incoming SMS recovered"
    )
    return lines


def _num(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


async def run_status(settings: Settings, *, out: TextIO, as_json: bool = False) -> int:
    """`cht-rapidpro status`: print the report; 0 once printed (CouchDB problems: 69/78)."""
    report = await collect(settings)
    if as_json:
        out.write(json.dumps(report.as_json(), indent=2, ensure_ascii=False, default=str) + "\n")
    else:
        out.write(render(report) + "\n")
    return EX_OK
