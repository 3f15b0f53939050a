"""Messages RapidPro sent on its own, as the outgoing-message documents CHT's web app writes.

Flow replies, campaign events and broadcasts made in RapidPro's UI or by other API clients
never pass through CHT. Mirrored, each becomes a `data_record` with `kujua_message: true` and one
task (cht-messaging §1.1), so CHT's Messages tab (`medic-client/messages_by_contact_date`) shows
it in the recipient's conversation: the task's message carries the contact (its minified
lineage, as the web app writes it) when CHT's `medic-client/contacts_by_phone` finds one for the
number, else only the number, which is how CHT threads messages of unknown senders too.

Exactly once: the document `_id` is RapidPro's message identity (`rapidpro-msg:<host>:<id>`), so
a second write of the same message, by a re-scan, a restart or another replica, is a conflict.
The task's `gateway_ref` is the same string: the status follower finds and updates it like any
tracked message, and the sender never sees it (its states are RapidPro's, never `pending` or
`forwarded-to-gateway`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .cht.state import STATUS_MAP, State, iso_now, set_task_state
from .rapidpro.models import Message
from .tracking import MIRROR_REF_PREFIX

SENT_BY = "RapidPro"
#: The namespace of the `uuid` given to a mirrored message RapidPro lists without one (v9).
_NAMESPACE = uuid.UUID("6f1c2a4e-3b7d-4e2a-9c1f-7a8b9c0d1e2f")


def mirror_id(host: str, message_id: Any) -> str:
    """The `_id` (and task `gateway_ref`) of the mirror of RapidPro message `message_id`.

    The host is part of it: another RapidPro server numbers its messages from 1 again.
    """
    return f"{MIRROR_REF_PREFIX}{host}:{message_id}"


def sent_by(row: Message) -> str:
    """`sent_by`: RapidPro, and the flow's name when a flow sent it."""
    if row.flow is not None and row.flow.name:
        return f"{SENT_BY} (flow: {row.flow.name})"
    return SENT_BY


def recipient(urn: str | None) -> str | None:
    """The number CHT threads the message under: `tel:+2547…` → `+2547…`."""
    if not urn:
        return None
    scheme, _, path = urn.partition(":")
    return path if scheme == "tel" and path else urn


def minify(contact: Mapping[str, Any]) -> dict[str, Any] | None:
    """CHT's `lineage.minify`: the contact's `_id` and its parents' `_id`s, nested."""
    contact_id = contact.get("_id")
    if not isinstance(contact_id, str):
        return None
    result: dict[str, Any] = {"_id": contact_id}
    parent = contact.get("parent")
    if isinstance(parent, Mapping):
        minified = minify(parent)
        if minified is not None:
            result["parent"] = minified
    return result


def mirror_doc(
    row: Message,
    *,
    host: str,
    contact: Mapping[str, Any] | None,
    now: datetime | None = None,
) -> dict[str, Any] | None:
    """The document for an outgoing row of RapidPro's log, or None if it cannot be one
    (no number, no text: CHT's views need `to` and `message`)."""
    to = recipient(row.urn)
    text = row.text
    if not to or not isinstance(text, str) or not text or row.created_on is None:
        return None
    ref = mirror_id(host, row.id)
    message: dict[str, Any] = {
        "uuid": row.uuid or str(uuid.uuid5(_NAMESPACE, f"{host}/{row.id}")),
        "to": to,
        "message": text,
    }
    if contact is not None:
        message["contact"] = dict(contact)
    state, details = STATUS_MAP.get(row.status or "", (State.RECEIVED_BY_GATEWAY, "Queued"))
    task: dict[str, Any] = {"messages": [message]}
    set_task_state(task, state, details, ref, now=now)
    flow = {"uuid": row.flow.uuid, "name": row.flow.name} if row.flow else None
    return {
        "_id": ref,
        "type": "data_record",
        "form": None,
        "kujua_message": True,
        "sent_by": sent_by(row),
        "reported_date": int(row.created_on.timestamp() * 1000),
        "errors": [],
        "tasks": [task],
        # Where it came from, for people looking at the document (no phone numbers here).
        "rapidpro": {
            "message_id": row.id,
            "message_uuid": row.uuid,
            "broadcast": row.broadcast,
            "flow": flow,
            "created_on": iso_now(row.created_on),
        },
    }
