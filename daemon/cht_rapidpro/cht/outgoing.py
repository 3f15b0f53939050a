"""Outgoing messages inside CHT documents: what is sendable, who claimed it, what is in flight.

Pure functions over a document dict. A *claim* is how a daemon records, in a CouchDB
revision, that it is about to send a task's messages: the task goes to
`forwarded-to-gateway` with `state_details` naming the claimant (see `claim_details`).
CouchDB's MVCC lets exactly one writer win each claim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeGuard

from .state import (
    IN_FLIGHT_STATES,
    SENDABLE_STATES,
    State,
    js_truthy,
    parse_iso,
)

TaskList = Literal["tasks", "scheduled_tasks"]
TASK_LISTS: tuple[TaskList, ...] = ("tasks", "scheduled_tasks")  # CHT's order

#: `sms.outgoing_service` values with which CHT itself sends: its API's push services
#: (messaging.js: rapidpro, africas-talking, nepal-doit-sms; each sends every message in
#: `pending` or `forwarded-to-gateway`, so also what this daemon has claimed) and medic-gateway
#: (phones fetch pending messages from the API). Beside any of them this daemon is a second
#: sender of the same messages; any other value (e.g. `cht-rapidpro`) keeps CHT idle.
CHT_OUTGOING_SERVICES = frozenset(
    {"rapidpro", "africas-talking", "nepal-doit-sms", "medic-gateway"}
)

#: `state_details["claimed_by"]` of our claims: tells them apart from medic-gateway's
#: `forwarded-to-gateway`, which is simply sendable.
CLAIM_MARK = "cht-rapidpro"


class MalformedTaskError(ValueError):
    """A task or message has the wrong shape; the document is skipped and counted."""


@dataclass(frozen=True, slots=True)
class TaskRef:
    """Where a task sits in its document."""

    doc_id: str
    task_list: TaskList
    index: int

    @property
    def key(self) -> str:
        return f"{self.doc_id}/{self.task_list}/{self.index}"


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One sendable message (`uuid`, `to` and `message` all truthy, as CHT requires)."""

    uuid: str
    to: str
    text: str


@dataclass(frozen=True, slots=True)
class Claim:
    """A claim found on a task."""

    instance: str
    boot: str
    at: datetime | None  # when the current claim was written
    since: datetime | None  # when the run of consecutive claims started (lookup window)


@dataclass(frozen=True, slots=True)
class SendableTask:
    """A task in `pending`/`forwarded-to-gateway` with at least one sendable message."""

    ref: TaskRef
    messages: tuple[OutgoingMessage, ...]
    claim: Claim | None


@dataclass(frozen=True, slots=True)
class InFlightTask:
    """A task RapidPro accepted whose delivery status is still worth polling."""

    ref: TaskRef
    gateway_ref: Any
    state: str
    messages: tuple[OutgoingMessage, ...]
    sent_at: datetime | None
    details: Any = None  # `state_details` as stored


def claim_details(instance: str, boot: str) -> dict[str, str]:
    """The `state_details` object that marks a claim by this daemon process."""
    return {"claimed_by": CLAIM_MARK, "instance": instance, "boot": boot}


def _is_claim_details(details: Any) -> TypeGuard[dict[str, Any]]:
    return isinstance(details, dict) and details.get("claimed_by") == CLAIM_MARK


def _history(task: Mapping[str, Any]) -> list[Any]:
    history = task.get("state_history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise MalformedTaskError("state_history is not a list")
    return history


#: A `pending`/`scheduled` entry after a state outside this set starts a new send attempt
#: (a resend from the web app, an unmuted schedule): earlier claims belong to the old one.
_WITHIN_ATTEMPT = frozenset({State.SCHEDULED, State.PENDING, State.FORWARDED_TO_GATEWAY})


def current_attempt(task: Mapping[str, Any]) -> list[Any]:
    """The `state_history` entries of the task's current send attempt.

    An attempt ends with any state other than scheduled/pending/forwarded-to-gateway
    (received-by-gateway, failed, cleared, …); what follows is a new attempt. Within one
    attempt every claim entry counts, wherever it sits: histories merged from conflicting
    branches (see `merge.py`) interleave entries by time.
    """
    history = _history(task)
    start = 0
    for index, entry in enumerate(history):
        if isinstance(entry, dict) and entry.get("state") not in _WITHIN_ATTEMPT:
            start = index + 1
    return history[start:]


@dataclass(frozen=True, slots=True)
class ClaimEntry:
    """One claim entry of a task's history: who claimed, and when."""

    instance: str
    boot: str
    timestamp: str


def claim_entries(task: Mapping[str, Any]) -> frozenset[ClaimEntry]:
    """Every claim written on the task in its current attempt, by anyone."""
    found = set()
    for entry in current_attempt(task):
        if (
            isinstance(entry, dict)
            and entry.get("state") == State.FORWARDED_TO_GATEWAY
            and _is_claim_details(details := entry.get("state_details"))
        ):
            found.add(
                ClaimEntry(
                    instance=str(details.get("instance", "")),
                    boot=str(details.get("boot", "")),
                    timestamp=str(entry.get("timestamp", "")),
                )
            )
    return frozenset(found)


def find_claim(task: Mapping[str, Any]) -> Claim | None:
    """The claim on `task`, if its current state is one of our claims.

    `at` is the newest claim entry of the current attempt (the claim's lease starts there),
    `since` the oldest (any claimant of this attempt may have posted after it).
    """
    details = task.get("state_details")
    if task.get("state") != State.FORWARDED_TO_GATEWAY or not _is_claim_details(details):
        return None
    stamps = [
        stamp for entry in claim_entries(task) if (stamp := parse_iso(entry.timestamp)) is not None
    ]
    return Claim(
        instance=str(details.get("instance", "")),
        boot=str(details.get("boot", "")),
        at=max(stamps) if stamps else None,
        since=min(stamps) if stamps else None,
    )


def _messages(task: Mapping[str, Any]) -> tuple[OutgoingMessage, ...]:
    """Sendable messages of a task; raises MalformedTaskError on a wrong shape."""
    messages = task.get("messages")
    if messages is None:
        return ()
    if not isinstance(messages, list):
        raise MalformedTaskError("messages is not a list")
    found = []
    for message in messages:
        if not isinstance(message, dict):
            raise MalformedTaskError("message is not an object")
        uuid, to, text = message.get("uuid"), message.get("to"), message.get("message")
        if not (js_truthy(uuid) and js_truthy(to) and js_truthy(text)):
            continue  # CHT's views skip these too (e.g. generation errors)
        # A number where CHT expects a string works in CHT ('tel:' + 12345): do the same.
        uuid, to = _js_string(uuid), _js_string(to)
        if not isinstance(uuid, str) or not isinstance(to, str) or not isinstance(text, str):
            raise MalformedTaskError("message uuid, to and message must be strings")
        found.append(OutgoingMessage(uuid=uuid, to=to, text=text))
    return tuple(found)


def iter_tasks(doc: Mapping[str, Any]) -> Iterator[tuple[TaskRef, Mapping[str, Any]]]:
    """Every task of a document, `tasks` first and then `scheduled_tasks` (CHT's order)."""
    doc_id = doc.get("_id")
    if not isinstance(doc_id, str):
        return
    for task_list in TASK_LISTS:
        tasks = doc.get(task_list)
        if tasks is None:
            continue
        if not isinstance(tasks, list):
            raise MalformedTaskError(f"{task_list} is not a list")
        for index, task in enumerate(tasks):
            if not isinstance(task, dict):
                raise MalformedTaskError(f"{task_list}[{index}] is not an object")
            yield TaskRef(doc_id, task_list, index), task


def _js_string(value: Any) -> Any:
    """Numbers as JS's String() writes integers; anything else unchanged."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def sendable_tasks(
    doc: Mapping[str, Any], on_malformed: Callable[[TaskRef, str], None] | None = None
) -> list[SendableTask]:
    """Tasks the send loop must act on, in CHT's order.

    A malformed task raises MalformedTaskError, or, given `on_malformed`, is reported there
    and skipped so that the document's other tasks still go out.
    """
    found = []
    for ref, task in iter_tasks(doc):
        if task.get("state") not in SENDABLE_STATES:
            continue
        try:
            messages = _messages(task)
        except MalformedTaskError as exc:
            if on_malformed is None:
                raise
            on_malformed(ref, str(exc))
            continue
        if messages:
            found.append(SendableTask(ref=ref, messages=messages, claim=find_claim(task)))
    return found


def sent_at(task: Mapping[str, Any], doc: Mapping[str, Any]) -> datetime | None:
    """When the task was handed to the gateway, as a lower bound for RapidPro's `created_on`.

    It is the last `pending`/`forwarded-to-gateway` history entry (the send happened after
    it), else the first entry after it, else the document's `reported_date`.
    """
    history = _history(task)
    stamp: datetime | None = None
    for entry in history:
        if not isinstance(entry, dict):
            continue
        if entry.get("state") in SENDABLE_STATES:
            stamp = parse_iso(entry.get("timestamp")) or stamp
    if stamp is None:
        for entry in history:
            if isinstance(entry, dict) and (stamp := parse_iso(entry.get("timestamp"))):
                break
    if stamp is None:
        reported = doc.get("reported_date")
        if isinstance(reported, int | float) and not isinstance(reported, bool):
            try:
                stamp = datetime.fromtimestamp(reported / 1000, tz=UTC)
            except (OverflowError, ValueError, OSError):
                stamp = None
    return stamp


def in_flight_tasks(doc: Mapping[str, Any]) -> list[InFlightTask]:
    """Tasks with a `gateway_ref` in a state RapidPro may still change."""
    found = []
    for ref, task in iter_tasks(doc):
        if task.get("state") not in IN_FLIGHT_STATES or not js_truthy(task.get("gateway_ref")):
            continue
        messages = _messages(task)
        if messages:
            found.append(
                InFlightTask(
                    ref=ref,
                    gateway_ref=task["gateway_ref"],
                    state=str(task["state"]),
                    messages=messages,
                    sent_at=sent_at(task, doc),
                    details=task.get("state_details"),
                )
            )
    return found


def task_at(doc: Mapping[str, Any], ref: TaskRef) -> dict[str, Any] | None:
    """The task `ref` points at in (a possibly newer revision of) `doc`, if still there."""
    tasks = doc.get(ref.task_list)
    if not isinstance(tasks, list) or ref.index >= len(tasks):
        return None
    task = tasks[ref.index]
    return task if isinstance(task, dict) else None


def same_messages(task: Mapping[str, Any], messages: tuple[OutgoingMessage, ...]) -> bool:
    """True if `task` still carries exactly these sendable messages (index still valid)."""
    try:
        return _messages(task) == messages
    except MalformedTaskError:
        return False


def claim_age(claim: Claim, now: datetime) -> timedelta | None:
    return None if claim.at is None else now - claim.at
