"""Which CHT document an incoming SMS would have had, so that a missed one is stored once.

RapidPro calls the CHT flow's webhook once (rapidpro-api §6.3): an SMS that arrives while the
daemon is down stays in RapidPro only. The follower finds it in RapidPro's message log and stores
it as the webhook would have, under the `_id` the webhook would have given it, so that whichever
of the two writes second meets a conflict: one report, whatever the order (`incoming.py` derives
the `_id` from the body's `id`).

The body's `id` depends on the flow:

- CHT's documented body (`CHT_RAPIDPRO_INCOMING_ID=run`, the default) sends the flow **run's**
  uuid (`run.uuid`), which RapidPro's message log does not show. It is found through
  `GET runs.json?flow=`: CHT's flow starts one run per incoming message and ends it at once,
  and RapidPro writes the run and marks the message handled at the end of that one session, so
  a run pairs with the message of the same contact handled at the same moment (`pair_runs`);
- the recommended body (`CHT_RAPIDPRO_INCOMING_ID=message`) sends the **message's** uuid
  (`input.uuid`), which the log shows (TextIt; community RapidPro 9's API lists only the
  integer id, so there the run pairing is the only way).

Either way both ids are looked for before anything is stored (a flow changed from one body to
the other keeps its earlier reports), as is CHT's own record of the id
(`medic-sms/messages_by_gateway_ref`, for SMS CHT's API stored itself).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .rapidpro.models import Message, Run


@dataclass(frozen=True, slots=True)
class IncomingRow:
    """What pairing needs of an incoming message handled by a CHT flow."""

    id: Any
    contact: str | None
    flow: str | None
    created_on: datetime
    handled_on: datetime | None  # `modified_on`: when its flow session ended

    @classmethod
    def of(cls, row: Message) -> IncomingRow | None:
        if row.created_on is None:
            return None
        return cls(
            id=row.id,
            contact=row.contact_uuid,
            flow=row.flow.uuid if row.flow else None,
            created_on=row.created_on,
            handled_on=row.modified_on,
        )


#: A message and its run are written within one flow session: their times differ by less.
PAIR_TOLERANCE = timedelta(seconds=10)


def pair_runs(messages: Iterable[IncomingRow], runs: Iterable[Run]) -> dict[Any, Run]:
    """The run each message started, by message id.

    Per contact and flow, a message pairs with the run whose `modified_on` is nearest its own
    (the session that handled it wrote both), within PAIR_TOLERANCE, closest pairs first; a
    contact's next message is handled in a session of its own, after a whole webhook call.
    Runs of flow starts (not started by a message) never pair; a run whose message we have not
    read, or a message whose run is not listed, stays unpaired.
    """
    by_group: dict[tuple[str | None, str | None], list[IncomingRow]] = {}
    for message in messages:
        if message.handled_on is not None:
            by_group.setdefault((message.contact, message.flow), []).append(message)
    candidates: list[tuple[timedelta, str, str, IncomingRow, Run]] = []
    for run in runs:
        if run.started_by_flow_start or run.modified_on is None:
            continue
        for message in by_group.get((run.contact_uuid, run.flow_uuid), ()):
            assert message.handled_on is not None
            distance = abs(run.modified_on - message.handled_on)
            if distance <= PAIR_TOLERANCE:
                candidates.append((distance, str(message.id), str(run.id), message, run))
    candidates.sort(key=lambda c: c[:3])
    paired: dict[Any, Run] = {}
    taken: set[str | None] = set()
    for _, _, _, message, run in candidates:
        if message.id in paired or run.uuid in taken:
            continue
        paired[message.id] = run
        taken.add(run.uuid)
    return paired


def webhook_from(urn: str | None) -> str | None:
    """The `from` the flow sends: the message's number, `replace(input.urn, "tel:+", "+")` (CHT's
    documented `urns.tel` is the same for a contact with one number); None for a message that
    did not come on a phone number (the flow would send an empty `from`, which is refused)."""
    if not urn or not urn.startswith("tel:"):
        return None
    return urn.replace("tel:+", "+", 1)


@dataclass(frozen=True, slots=True)
class Identity:
    """The ids the webhook may have stored an SMS under, and the one to store it under."""

    candidates: tuple[str, ...]  # body ids to look for (run uuid, message uuid)
    store_as: str | None  # the body id to store it under now; None: not yet decidable
    problem: str | None = None  # why it can never be decided


MESSAGE_UUIDS_NEEDED = (
    "CHT_RAPIDPRO_INCOMING_ID=message needs message uuids in RapidPro's log (TextIt, "
    "RapidPro 10 and later); this RapidPro lists none: use CHT's flow body and =run"
)


def identity(
    row: Message, run: Run | None, *, mode: str, waited_s: float, pair_wait_s: float
) -> Identity:
    """Which body ids to look for, and which to store the SMS under (see the module docstring).

    In `run` mode a message whose run is not found is stored under its own uuid (or id) only
    after `pair_wait_s`: without a run the flow never called the webhook, so nothing else can
    hold it. In `message` mode a message without a uuid (RapidPro 9) can never be matched
    with the webhook's report, so it is never stored.
    """
    ids: list[str] = []
    if run is not None and run.uuid:
        ids.append(run.uuid)
    if row.uuid:
        ids.append(row.uuid)
    store_as: str | None
    if mode == "message":
        if not row.uuid:
            return Identity(tuple(ids), None, MESSAGE_UUIDS_NEEDED)
        return Identity(tuple(ids), row.uuid)
    store_as = run.uuid if run is not None and run.uuid else None
    if store_as is None and waited_s >= pair_wait_s:
        store_as = row.uuid or f"rapidpro-msg-{row.id}"
        if store_as not in ids:
            ids.append(store_as)
    return Identity(tuple(ids), store_as)


def reported_ms(row: Message) -> int | None:
    """The report's `reported_date`: when RapidPro received the SMS (the webhook would have
    stored it moments after; a recovered SMS must not look as new as its recovery)."""
    return None if row.created_on is None else int(row.created_on.timestamp() * 1000)


def by_id(rows: Iterable[Message]) -> Mapping[Any, Message]:
    return {row.id: row for row in rows}
