"""CHT message states, `@medic/task-utils` `setTaskState`, and RapidPro's status map.

Everything here must stay byte-compatible with what CHT writes: other CHT components and
views read these fields.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from .jsvalues import js_truthy as js_truthy  # re-exported: the outgoing path uses it
from .jsvalues import strict_equal


class State(StrEnum):
    """The task states CHT knows (cht-messaging §1.5)."""

    SCHEDULED = "scheduled"
    PENDING = "pending"
    FORWARDED_TO_GATEWAY = "forwarded-to-gateway"
    RECEIVED_BY_GATEWAY = "received-by-gateway"
    FORWARDED_BY_GATEWAY = "forwarded-by-gateway"
    SENT = "sent"
    DELIVERED = "delivered"
    FAILED = "failed"
    DENIED = "denied"
    DUPLICATE = "duplicate"
    CLEARED = "cleared"
    CLEAR = "clear"
    MUTED = "muted"
    UNRECOGNISED = "unrecognised"


#: States the send loop picks up (CHT's `pending-or-forwarded`).
SENDABLE_STATES = frozenset({State.PENDING, State.FORWARDED_TO_GATEWAY})
#: States whose RapidPro delivery status is still worth polling.
IN_FLIGHT_STATES = frozenset({State.RECEIVED_BY_GATEWAY, State.FORWARDED_BY_GATEWAY, State.SENT})

#: RapidPro message status -> (CHT state, state_details). CHT's map (rapidpro.js), plus
#: `read` (current TextIt), which CHT lacks and would turn into a regression.
STATUS_MAP: dict[str, tuple[State, str]] = {
    "queued": (State.RECEIVED_BY_GATEWAY, "Queued"),
    "wired": (State.FORWARDED_BY_GATEWAY, "Wired"),
    "sent": (State.SENT, "Sent"),
    "delivered": (State.DELIVERED, "Delivered"),
    "read": (State.DELIVERED, "Read"),
    "resent": (State.SENT, "Resent"),
    "errored": (State.RECEIVED_BY_GATEWAY, "Errored"),
    "failed": (State.FAILED, "Failed"),
}
FINAL_STATUSES = frozenset({"delivered", "read", "failed"})


def iso_now(now: datetime | None = None) -> str:
    """`new Date().toISOString()`: UTC, millisecond precision, `Z` suffix."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def set_task_state(
    task: MutableMapping[str, Any],
    state: str,
    details: Any = None,
    gateway_ref: Any = None,
    *,
    now: datetime | None = None,
) -> bool:
    """Port of `@medic/task-utils` `setTaskState`; None stands for JS `undefined`.

    It is a no-op (returns False) only when the state, the last history entry's state, the
    details (when given) and the gateway_ref (when given) all already match. Otherwise it
    overwrites state, details and gateway_ref (None clears them, as in CHT) and appends a
    history entry.
    """
    history: Any = task.get("state_history")
    if not js_truthy(history):
        history = []
        task["state_history"] = history
    last = history[-1] if history else None
    if (
        task.get("state") == state
        and isinstance(last, dict)
        and last.get("state") == state
        and (not js_truthy(details) or strict_equal(task.get("state_details"), details))
        and (not js_truthy(gateway_ref) or strict_equal(task.get("gateway_ref"), gateway_ref))
    ):
        return False
    task["state"] = state
    if details is None:
        task.pop("state_details", None)
    else:
        task["state_details"] = details
    if gateway_ref is None:
        task.pop("gateway_ref", None)
    else:
        task["gateway_ref"] = gateway_ref
    entry: dict[str, Any] = {"state": state}
    if details is not None:
        entry["state_details"] = details
    entry["timestamp"] = iso_now(now)
    history.append(entry)
    return True


def parse_iso(value: Any) -> datetime | None:
    """Parse an ISO-8601 timestamp as written by JS or RapidPro; None if it is not one."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
