"""`cht-rapidpro send`: write an outgoing SMS as CHT's web app does, then watch its states.

The command never talks to RapidPro: it creates the document (spec cht-messaging §1.1, CHT's
`send-message.service.ts`) and follows it through the medic db's changes feed while a daemon
(or CHT itself) sends it, printing every state the task goes through until a final one.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime
from typing import Any, TextIO

from ..cht import phone
from ..cht.outgoing import CHT_OUTGOING_SERVICES as CHT_SERVICES
from ..cht.state import State, parse_iso, set_task_state
from ..config import Settings
from ..couch.client import CouchClient, JsonDict
from ..errors import AuthError, GatewayError
from .common import (
    EX_FAILED,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    CommandError,
    load_app_settings,
    open_couch,
    require_db,
    sms_settings,
)

#: States after which nothing more happens to the message (exit 0 for delivered, else 1).
#: `failed`/`delivered` are RapidPro's finals; the rest are CHT's "never sent" states.
FINAL_STATES = frozenset(
    {
        State.DELIVERED,
        State.FAILED,
        State.DENIED,
        State.DUPLICATE,
        State.CLEARED,
        State.CLEAR,
        State.MUTED,
    }
)
DEFAULT_SENT_BY = "cht-rapidpro"
#: Long-poll heartbeat of the feed we follow (the server answers within six of them).
FEED_HEARTBEAT_S = 2.0
FEED_BATCH = 500


def message_doc(
    app_settings: dict[str, Any],
    to: str,
    text: str,
    *,
    sent_by: str = DEFAULT_SENT_BY,
    sender_phone: str | None = None,
    now_ms: int | None = None,
) -> JsonDict:
    """The `data_record` CHT's web app writes for one recipient (send-message.service.ts).

    `to` is normalised as the web app does (`phoneNumber.normalize(settings, phone) || phone`);
    the task is `pending` through `setTaskState`. `from` is the sender's phone, left out when
    unknown (JS `undefined`).
    """
    message: JsonDict = {
        "sent_by": sent_by,
        "to": phone.normalize(app_settings, to) or to,
        "message": text,
        "uuid": str(uuid.uuid4()),
    }
    doc: JsonDict = {
        "_id": str(uuid.uuid4()),
        "type": "data_record",
        "form": None,
        "kujua_message": True,
        "sent_by": sent_by,
        "reported_date": now_ms if now_ms is not None else int(time.time() * 1000),
        "errors": [],
        "tasks": [],
    }
    if sender_phone:
        message = {"from": sender_phone, **message}
        doc["from"] = sender_phone
    task: JsonDict = {"messages": [message]}
    set_task_state(task, State.PENDING.value)
    doc["tasks"].append(task)
    return doc


def _details(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        if value.get("claimed_by") == "cht-rapidpro":
            return f"claimed by {value.get('instance', '?')}"
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def _clock(timestamp: Any) -> str:
    moment = parse_iso(timestamp)
    if moment is None:
        return "--:--:--.---"
    local: datetime = moment.astimezone()
    return local.strftime("%H:%M:%S.") + f"{local.microsecond // 1000:03d}"


class _Follower:
    """Prints the task's new history entries as they appear."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self.shown = 0
        self.states: list[str] = []
        self.state: str | None = None
        self.details: Any = None
        self.gateway_ref: Any = None

    def update(self, task: JsonDict) -> None:
        history = task.get("state_history")
        entries = history if isinstance(history, list) else []
        ref = task.get("gateway_ref")
        for entry in entries[self.shown :]:
            if not isinstance(entry, dict):
                continue
            state = str(entry.get("state"))
            line = f"{_clock(entry.get('timestamp'))}  {state:<21}"
            detail = _details(entry.get("state_details"))
            if detail:
                line += f"  {detail}"
            if ref is not None and state == State.RECEIVED_BY_GATEWAY and ref != self.gateway_ref:
                line += f"  (broadcast {ref})"
                self.gateway_ref = ref
            self._out.write(line.rstrip() + "\n")
            self.states.append(state)
        self._out.flush()
        self.shown = max(self.shown, len(entries))
        self.state = task.get("state") if isinstance(task.get("state"), str) else None
        self.details = task.get("state_details")


async def _follow(
    couch: CouchClient, doc_id: str, since: Any, follower: _Follower, deadline: float
) -> str | None:
    """Follow the feed until the task is in a final state; returns it (None: doc deleted)."""
    loop = asyncio.get_running_loop()
    changed = True  # look at the document once before waiting for its changes
    while True:
        try:
            if not changed:
                page = await couch.changes(
                    since, limit=FEED_BATCH, heartbeat_s=FEED_HEARTBEAT_S, include_docs=False
                )
                if page.last_seq is not None:
                    since = page.last_seq
                changed = any(row.get("id") == doc_id for row in page.results)
            if changed:
                doc = await couch.get(doc_id)
                changed = False
                tasks = doc.get("tasks") if doc is not None else None
                task = tasks[0] if isinstance(tasks, list) and tasks else None
                if not isinstance(task, dict):
                    return None
                follower.update(task)
                if follower.state in FINAL_STATES:
                    return follower.state
        except AuthError:
            raise
        except GatewayError:
            # A blip of CouchDB is not the message's fate: wait and ask again (the message
            # exists by now; only the timeout ends the wait).
            await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))


async def run_send(
    settings: Settings,
    *,
    to: str,
    text: str,
    out: TextIO,
    err: TextIO,
    timeout_s: float = 60.0,
    sent_by: str = DEFAULT_SENT_BY,
    sender_phone: str | None = None,
) -> int:
    """`cht-rapidpro send`: 0 delivered, 1 failed (or never sent), 75 still on its way."""
    if not to.strip():
        raise CommandError("--to must be a phone number", EX_USAGE)
    if not text.strip():
        raise CommandError("--text must not be empty", EX_USAGE)
    if not timeout_s > 0:
        raise CommandError("--timeout must be a number of seconds greater than 0", EX_USAGE)
    async with open_couch(settings) as couch:
        info = await require_db(couch)
        app = await load_app_settings(couch)
        if app.source is None:
            err.write(
                "note: no CHT app settings in the database: the number is not normalised "
                "(run cht-rapidpro check)\n"
            )
        else:
            service = sms_settings(app.values).get("outgoing_service")
            if service != settings.service:
                other = " (CHT's own sender will, if CHT runs)" if service in CHT_SERVICES else ""
                err.write(
                    f"note: sms.outgoing_service is {service!r}, not {settings.service!r}: "
                    f"this daemon will not send the message until that changes{other} "
                    "(run cht-rapidpro check)\n"
                )
        doc = message_doc(app.values, to, text, sent_by=sent_by, sender_phone=sender_phone)
        message = doc["tasks"][0]["messages"][0]
        await couch.create(doc)
        shown_to = message["to"] if message["to"] == to else f"{message['to']} (from {to!r})"
        out.write(f"created message {message['uuid']} to {shown_to} in document {doc['_id']}\n")
        out.flush()
        follower = _Follower(out)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                final = await _follow(couch, doc["_id"], info.get("update_seq"), follower, deadline)
        except TimeoutError:
            out.write(
                f"no final state after {timeout_s:g}s: the message is {follower.state or '?'} "
                f"and may still go out (document {doc['_id']})\n"
            )
            return EX_TEMPFAIL
    if final is None:
        out.write(f"document {doc['_id']} was deleted or lost its task\n")
        return EX_FAILED
    trail = " → ".join(follower.states)
    if final == State.DELIVERED:
        out.write(f"delivered: {trail}\n")
        return EX_OK
    reason = _details(follower.details)
    out.write(f"{final}{': ' + reason if reason else ''}\n{trail}\n")
    return EX_FAILED
