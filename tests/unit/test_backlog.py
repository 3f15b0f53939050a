"""backlog: since when a message has waited to be sent, and the unsent backlog's gauges."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cht_rapidpro.backlog import UnsentBacklog, waiting_since

T0 = "2026-03-01T08:00:00.000Z"
T1 = "2026-03-01T09:00:00.000Z"
T2 = "2026-03-01T10:00:00.000Z"
REPORTED_MS = 1772323200000  # 2026-03-01T00:00:00Z


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def entry(state: str, timestamp: str | None, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"state": state, **extra}
    if timestamp is not None:
        item["timestamp"] = timestamp
    return item


def sendable(state: str = "pending", history: list[Any] | None = None, **extra: Any) -> dict:
    return {
        "messages": [{"uuid": "u1", "to": "+254700000001", "message": "hello"}],
        "state": state,
        "state_history": history if history is not None else [],
        **extra,
    }


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        (sendable(history=[entry("pending", T0)]), at(T0)),
        # Scheduled: it waits from when it became due (pending), not from its creation.
        (sendable(history=[entry("scheduled", T0), entry("pending", T1)]), at(T1)),
        # Claimed by a sender: still since it became pending.
        (
            sendable(
                "forwarded-to-gateway",
                [entry("pending", T0), entry("forwarded-to-gateway", T1)],
            ),
            at(T0),
        ),
        # Resent from the web app: a new attempt, waiting since the resend.
        (
            sendable(history=[entry("pending", T0), entry("failed", T1), entry("pending", T2)]),
            at(T2),
        ),
        # medic-gateway's own forwarded-to-gateway, without a pending entry.
        (sendable("forwarded-to-gateway", [entry("forwarded-to-gateway", T1)]), at(T1)),
        # No usable history: CHT's view's due (due || timestamp || reported_date).
        (sendable(history=[entry("pending", None)], due=T1, timestamp=T0), at(T1)),
        (sendable(timestamp=T0), at(T0)),
        (sendable(due=REPORTED_MS + 3_600_000), at("2026-03-01T01:00:00.000Z")),
        (sendable(), at("2026-03-01T00:00:00.000Z")),  # the document's reported_date
        (sendable(history="not a list"), at("2026-03-01T00:00:00.000Z")),
        (sendable(due="not a date"), None),
    ],
    ids=[
        "pending-entry",
        "scheduled-then-due",
        "claimed",
        "resent",
        "medic-gateway-forwarded",
        "due-without-history",
        "timestamp",
        "due-in-ms",
        "reported-date",
        "malformed-history",
        "unparseable-due",
    ],
)
def test_waiting_since(task: dict[str, Any], expected: datetime | None) -> None:
    assert waiting_since(task, {"reported_date": REPORTED_MS}) == expected


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def doc(doc_id: str, *tasks: dict[str, Any], scheduled: list[Any] | None = None) -> dict:
    body: dict[str, Any] = {"_id": doc_id, "type": "data_record", "tasks": list(tasks)}
    if scheduled is not None:
        body["scheduled_tasks"] = scheduled
    return body


def test_counts_unsent_messages_and_the_oldest_age() -> None:
    clock = Clock(at(T2).timestamp())
    backlog = UnsentBacklog(clock)
    assert (backlog.messages, backlog.oldest_age_s()) == (0, 0.0)

    two = sendable(history=[entry("pending", T1)])
    two["messages"].append({"uuid": "u2", "to": "+254700000002", "message": "again"})
    backlog.update_doc(doc("a", two, sendable("sent", [entry("sent", T0)])))
    backlog.update_doc(doc("b", scheduled=[sendable(history=[entry("pending", T0)])]))
    assert backlog.messages == 3
    assert backlog.oldest_age_s() == 2 * 3600  # b, pending since T0

    # b is sent: a (since T1) is the oldest now; a's new revision keeps its count.
    backlog.update_doc(doc("b", scheduled=[sendable("received-by-gateway")]))
    backlog.update_doc(doc("a", two))
    assert (backlog.messages, backlog.oldest_age_s()) == (2, 3600)
    backlog.remove_doc("a")
    backlog.remove_doc("never-seen")
    assert (backlog.messages, backlog.oldest_age_s()) == (0, 0.0)


def test_without_any_date_a_message_waits_from_when_it_was_first_seen() -> None:
    clock = Clock(1000.0)
    backlog = UnsentBacklog(clock)
    undated = {"_id": "c", "tasks": [sendable()]}  # no history, no due, no reported_date
    backlog.update_doc(undated)
    clock.now = 1060.0
    backlog.update_doc(undated)  # a later revision does not restart the wait
    assert backlog.oldest_age_s() == 60.0


@pytest.mark.parametrize(
    "body",
    [
        {"_id": "d", "tasks": "not a list"},
        {"_id": "d", "tasks": [sendable("pending", messages="nope")]},
        {"_id": "d", "tasks": [sendable("cleared")]},
        {"_id": "d", "tasks": [{"state": "pending", "messages": [{"uuid": "u", "to": ""}]}]},
        {"tasks": [sendable()]},
    ],
    ids=["tasks-not-a-list", "malformed-messages", "cleared", "no-sendable-message", "no-id"],
)
def test_documents_without_unsent_messages_leave_or_never_enter(body: dict[str, Any]) -> None:
    backlog = UnsentBacklog(Clock(at(T2).timestamp()))
    backlog.update_doc(doc("d", sendable(history=[entry("pending", T0)])))
    backlog.update_doc(body)
    expected = 0 if body.get("_id") == "d" else 1
    assert backlog.messages == expected


def test_a_clock_behind_the_documents_never_gives_a_negative_age() -> None:
    backlog = UnsentBacklog(Clock(at(T0).timestamp()))
    backlog.update_doc(doc("e", sendable(history=[entry("pending", T2)])))  # from a phone ahead
    assert backlog.oldest_age_s() == 0.0
