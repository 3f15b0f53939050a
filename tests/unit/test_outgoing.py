"""cht.outgoing: sendable tasks, claims and in-flight tasks over CHT documents (§1.1-§1.3)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cht_rapidpro.cht.outgoing import (
    CLAIM_MARK,
    Claim,
    MalformedTaskError,
    OutgoingMessage,
    TaskRef,
    claim_age,
    claim_details,
    claim_entries,
    find_claim,
    in_flight_tasks,
    iter_tasks,
    same_messages,
    sendable_tasks,
    sent_at,
    task_at,
)
from cht_rapidpro.cht.state import State, set_task_state

T0 = datetime(2026, 5, 1, 8, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(seconds=30)
T2 = T0 + timedelta(seconds=90)
ISO0, ISO1, ISO2 = (
    "2026-05-01T08:00:00.000Z",
    "2026-05-01T08:00:30.000Z",
    "2026-05-01T08:01:30.000Z",
)


def message(n: int, **overrides: Any) -> dict[str, Any]:
    return {"uuid": f"uuid-{n}", "to": f"+2547000000{n:02d}", "message": f"message{n}"} | overrides


def out(n: int) -> OutgoingMessage:
    return OutgoingMessage(uuid=f"uuid-{n}", to=f"+2547000000{n:02d}", text=f"message{n}")


def task(state: str | None, *messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    result: dict[str, Any] = {"messages": list(messages), **extra}
    if state is not None:
        result["state"] = state
    return result


def doc(tasks: list[Any] | None = None, scheduled: list[Any] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {"_id": "doc-1", "type": "data_record", "reported_date": 0}
    if tasks is not None:
        result["tasks"] = tasks
    if scheduled is not None:
        result["scheduled_tasks"] = scheduled
    return result


def refs(found: list[Any]) -> list[tuple[str, int]]:
    return [(item.ref.task_list, item.ref.index) for item in found]


# --------------------------------------------------------------------------- sendable_tasks


def test_sendable_tasks_e2e_shape() -> None:
    """§6.6 item 60: pending + sent in tasks, 4 pending scheduled tasks: 5 sends, CHT order."""
    document = doc(
        tasks=[task("pending", message(1)), task("sent", message(2))],
        scheduled=[task("pending", message(n)) for n in (3, 4, 5, 6)],
    )
    found = sendable_tasks(document)
    assert refs(found) == [
        ("tasks", 0),
        ("scheduled_tasks", 0),
        ("scheduled_tasks", 1),
        ("scheduled_tasks", 2),
        ("scheduled_tasks", 3),
    ]
    assert [item.messages for item in found] == [(out(n),) for n in (1, 3, 4, 5, 6)]
    assert found[0].ref == TaskRef("doc-1", "tasks", 0)
    assert found[0].ref.key == "doc-1/tasks/0"
    assert all(item.claim is None for item in found)


@pytest.mark.parametrize(
    ("state", "sendable"),
    [(state.value, state in (State.PENDING, State.FORWARDED_TO_GATEWAY)) for state in State]
    + [(None, False), ("PENDING", False), ("", False)],
    ids=[state.value for state in State] + ["no-state", "upper-case", "empty"],
)
@pytest.mark.parametrize("task_list", ["tasks", "scheduled_tasks"])
def test_only_pending_and_forwarded_are_sendable(
    task_list: str, state: str | None, sendable: bool
) -> None:
    """§1.3: the send queue is `pending` + `forwarded-to-gateway`, in both arrays."""
    document = {"_id": "doc-1", task_list: [task(state, message(1))]}
    found = sendable_tasks(document)
    assert refs(found) == ([(task_list, 0)] if sendable else [])


def test_medic_gateway_forwarded_task_is_sendable_without_claim() -> None:
    """§8.15: a task medic-gateway fetched (`forwarded-to-gateway`) is (re)sent."""
    forwarded = task("forwarded-to-gateway", message(1), state_details={"reason": "x"})
    (found,) = sendable_tasks(doc(tasks=[forwarded]))
    assert found.messages == (out(1),)
    assert found.claim is None


@pytest.mark.parametrize(
    "bad_message",
    [
        message(9, uuid=None),
        message(9, uuid=""),
        {"to": "+254700000009", "message": "m"},
        message(9, to=None),
        message(9, to=""),
        {"uuid": "u", "message": "m"},
        message(9, message=None),
        message(9, message=""),
        {"uuid": "u", "to": "+254700000009"},
        {"uuid": "u", "to": "+254700000009", "error": "messages.errors.patient.missing"},
        message(9, uuid=0),
        message(9, message=False),
        {},
    ],
    ids=[
        "uuid-null",
        "uuid-empty",
        "uuid-missing",
        "to-null",
        "to-empty",
        "to-missing",
        "text-null",
        "text-empty",
        "text-missing",
        "generation-error",
        "uuid-zero",
        "text-false",
        "empty-object",
    ],
)
def test_messages_without_uuid_to_and_text_are_skipped(bad_message: dict[str, Any]) -> None:
    """§1.3: sendable only if `uuid`, `to` and `message` are all truthy (JS truthiness)."""
    assert sendable_tasks(doc(tasks=[task("pending", bad_message)])) == []
    (found,) = sendable_tasks(doc(tasks=[task("pending", bad_message, message(1))]))
    assert found.messages == (out(1),)


def test_whitespace_text_is_truthy_and_sent() -> None:
    (found,) = sendable_tasks(doc(tasks=[task("pending", message(1, message=" "))]))
    assert found.messages[0].text == " "


def test_all_messages_of_a_task_are_kept_in_order() -> None:
    (found,) = sendable_tasks(doc(tasks=[task("pending", message(1), message(2))]))
    assert found.messages == (out(1), out(2))


@pytest.mark.parametrize(
    "document",
    [
        {"_id": "doc-1"},
        doc(tasks=[], scheduled=[]),
        doc(tasks=None, scheduled=None) | {"tasks": None, "scheduled_tasks": None},
        doc(scheduled=[{"state": "pending", "translation_key": "visit.reminder", "due": ISO0}]),
        doc(tasks=[{"state": "pending", "messages": None}]),
        doc(tasks=[{"state": "pending", "messages": []}]),
        {"tasks": [task("pending", message(1))]},
        {"_id": 42, "tasks": [task("pending", message(1))]},
    ],
    ids=[
        "no-arrays",
        "empty-arrays",
        "null-arrays",
        "scheduled-translation-key-without-messages",
        "messages-null",
        "messages-empty",
        "doc-without-id",
        "doc-id-not-a-string",
    ],
)
def test_documents_with_nothing_to_send(document: dict[str, Any]) -> None:
    assert sendable_tasks(document) == []


@pytest.mark.parametrize(
    "document",
    [
        {"_id": "doc-1", "tasks": {"0": task("pending", message(1))}},
        {"_id": "doc-1", "scheduled_tasks": "pending"},
        doc(tasks=["pending"]),
        doc(tasks=[None]),
        doc(tasks=[{"state": "pending", "messages": {"uuid": "u"}}]),
        doc(tasks=[{"state": "pending", "messages": "hello"}]),
        doc(tasks=[task("pending", "hello")]),  # type: ignore[arg-type]
        doc(tasks=[task("pending", message(1, uuid=1.5))]),
        doc(tasks=[task("pending", message(1, to=["254700000001"]))]),
        doc(tasks=[task("pending", message(1, message=["hello"]))]),
        doc(
            tasks=[
                task(
                    "forwarded-to-gateway",
                    message(1),
                    state_details=claim_details("a", "b"),
                    state_history="oops",
                )
            ]
        ),
    ],
    ids=[
        "tasks-is-object",
        "scheduled-tasks-is-string",
        "task-is-string",
        "task-is-null",
        "messages-is-object",
        "messages-is-string",
        "message-is-string",
        "uuid-is-float",
        "to-is-array",
        "text-is-array",
        "claimed-task-history-not-a-list",
    ],
)
def test_malformed_sendable_tasks_raise(document: dict[str, Any]) -> None:
    with pytest.raises(MalformedTaskError):
        sendable_tasks(document)


def test_integer_uuid_and_to_are_sent_as_js_strings() -> None:
    # CHT builds 'tel:' + to, so a number works there; it works here too.
    document = doc(tasks=[task("pending", message(1, uuid=123, to=254700000001))])
    [sendable] = sendable_tasks(document)
    [outgoing] = sendable.messages
    assert (outgoing.uuid, outgoing.to) == ("123", "254700000001")


def test_malformed_tasks_can_be_skipped_one_by_one() -> None:
    document = doc(tasks=[{"state": "pending", "messages": "oops"}, task("pending", message(1))])
    problems: list[tuple[str, str]] = []
    found = sendable_tasks(document, lambda ref, problem: problems.append((ref.key, problem)))
    assert refs(found) == [("tasks", 1)]
    assert problems == [("doc-1/tasks/0", "messages is not a list")]


def test_malformed_messages_in_unsendable_tasks_are_ignored() -> None:
    """Only tasks in the send queue have their messages inspected."""
    document = doc(
        tasks=[
            {"state": "sent", "messages": "not-a-list"},
            {"state": "delivered", "messages": [None]},
            task("pending", message(1)),
        ]
    )
    assert refs(sendable_tasks(document)) == [("tasks", 2)]


def test_malformed_task_error_is_a_value_error() -> None:
    assert issubclass(MalformedTaskError, ValueError)


def test_sendable_tasks_does_not_modify_the_document() -> None:
    document = doc(tasks=[task("pending", message(1))], scheduled=[task("sent", message(2))])
    before = copy.deepcopy(document)
    sendable_tasks(document)
    in_flight_tasks(document)
    assert document == before


# --------------------------------------------------------------------------- claims


def test_claim_details_shape() -> None:
    assert claim_details("host:5989", "boot-1") == {
        "claimed_by": CLAIM_MARK,
        "instance": "host:5989",
        "boot": "boot-1",
    }
    assert CLAIM_MARK == "cht-rapidpro"


def claimed(*stamps: datetime, instance: str = "host:5989", boot: str = "boot-1") -> dict[str, Any]:
    """A pending task claimed once per stamp, through set_task_state as the sender does."""
    claimed_task = task("pending", message(1))
    set_task_state(claimed_task, "pending", now=T0 - timedelta(hours=1))
    for stamp in stamps:
        set_task_state(
            claimed_task, State.FORWARDED_TO_GATEWAY, claim_details(instance, boot), now=stamp
        )
    return claimed_task


def test_claim_written_by_set_task_state_is_found() -> None:
    claim = find_claim(claimed(T0))
    assert claim == Claim(instance="host:5989", boot="boot-1", at=T0, since=T0)


def test_consecutive_claims_keep_the_first_as_since() -> None:
    """A take-over appends another claim entry: `at` is the newest, `since` the oldest."""
    claimed_task = claimed(T0)
    set_task_state(
        claimed_task, State.FORWARDED_TO_GATEWAY, claim_details("other:5989", "boot-2"), now=T2
    )
    claim = find_claim(claimed_task)
    assert claim == Claim(instance="other:5989", boot="boot-2", at=T2, since=T0)


def test_claims_of_an_earlier_attempt_do_not_count() -> None:
    """A resend (failed, then pending again) starts a new attempt: the old claims are done."""
    claimed_task = claimed(T0)
    set_task_state(claimed_task, "failed", "Failed", now=T0 + timedelta(seconds=1))
    set_task_state(claimed_task, "pending", now=T1)
    set_task_state(claimed_task, State.FORWARDED_TO_GATEWAY, claim_details("a", "b"), now=T2)
    claim = find_claim(claimed_task)
    assert claim is not None
    assert (claim.at, claim.since) == (T2, T2)
    assert [e.timestamp for e in claim_entries(claimed_task)] == [ISO2]


def test_every_claim_of_the_attempt_counts_wherever_it_sits() -> None:
    """A `pending` entry inside an attempt (e.g. merged in from a conflicting branch) does not
    hide earlier claims: any of them may have posted, so the lookup window starts at the
    first."""
    claimed_task = claimed(T0)
    set_task_state(claimed_task, "pending", now=T1)
    set_task_state(claimed_task, State.FORWARDED_TO_GATEWAY, claim_details("a", "b"), now=T2)
    claim = find_claim(claimed_task)
    assert claim is not None
    assert (claim.at, claim.since) == (T2, T0)
    assert {e.instance for e in claim_entries(claimed_task)} == {"host:5989", "a"}


def test_claim_times_come_from_the_entries_not_their_order() -> None:
    """Merged histories can hold claims out of order: `at` is the newest, `since` the oldest."""
    claimed_task = task("forwarded-to-gateway", message(1), state_details=claim_details("a", "b"))
    claimed_task["state_history"] = [
        {"state": "forwarded-to-gateway", "state_details": claim_details("a", "b"), "timestamp": t}
        for t in (ISO1, ISO2, ISO0)
    ]
    assert find_claim(claimed_task) == Claim(instance="a", boot="b", at=T2, since=T0)


def test_claim_is_found_by_sendable_tasks() -> None:
    (found,) = sendable_tasks(doc(tasks=[claimed(T0, T1)]))
    assert found.claim == Claim(instance="host:5989", boot="boot-1", at=T1, since=T0)
    assert found.messages == (out(1),)


@pytest.mark.parametrize(
    "candidate",
    [
        task("forwarded-to-gateway", message(1)),
        task("forwarded-to-gateway", message(1), state_details={"reason": "fetched"}),
        task("forwarded-to-gateway", message(1), state_details="cht-rapidpro"),
        task(
            "forwarded-to-gateway",
            message(1),
            state_details={"claimed_by": "someone-else", "instance": "a", "boot": "b"},
        ),
        task("pending", message(1), state_details=claim_details("a", "b")),
        task("received-by-gateway", message(1), state_details=claim_details("a", "b")),
    ],
    ids=[
        "medic-gateway-no-details",
        "medic-gateway-reason",
        "string-details",
        "other-claimant",
        "pending-with-claim-details",
        "accepted-with-claim-details",
    ],
)
def test_not_a_claim(candidate: dict[str, Any]) -> None:
    assert find_claim(candidate) is None


@pytest.mark.parametrize(
    ("history", "at", "since"),
    [
        (None, None, None),
        ([], None, None),
        ([{"state": "forwarded-to-gateway", "state_details": claim_details("a", "b")}], None, None),
        (
            [
                {
                    "state": "forwarded-to-gateway",
                    "state_details": claim_details("a", "b"),
                    "timestamp": "not a date",
                }
            ],
            None,
            None,
        ),
        (
            [
                {
                    "state": "forwarded-to-gateway",
                    "state_details": claim_details("a", "b"),
                    "timestamp": ISO1,
                },
                "garbage",
            ],
            T1,
            T1,
        ),
    ],
    ids=[
        "no-history",
        "empty-history",
        "entry-without-timestamp",
        "unparseable-timestamp",
        "last-entry-not-an-object",
    ],
)
def test_claim_times_from_imperfect_histories(
    history: list[Any] | None, at: datetime | None, since: datetime | None
) -> None:
    candidate = task("forwarded-to-gateway", message(1), state_details=claim_details("a", "b"))
    if history is not None:
        candidate["state_history"] = history
    claim = find_claim(candidate)
    assert claim == Claim(instance="a", boot="b", at=at, since=since)
    assert claim_age(claim, T2) == (None if at is None else T2 - at)


def test_claim_age() -> None:
    claim = find_claim(claimed(T0))
    assert claim is not None
    assert claim_age(claim, T2) == T2 - T0


# --------------------------------------------------------------------------- in flight


@pytest.mark.parametrize(
    ("state", "gateway_ref", "in_flight"),
    [
        ("received-by-gateway", 101, True),
        ("forwarded-by-gateway", 101, True),
        ("sent", 101, True),
        ("sent", "broadcast1", True),
        ("received-by-gateway", None, False),
        ("received-by-gateway", "", False),
        ("received-by-gateway", 0, False),
        ("delivered", 101, False),
        ("failed", 101, False),
        ("pending", 101, False),
        ("forwarded-to-gateway", 101, False),
        ("scheduled", 101, False),
        ("muted", 101, False),
        ("duplicate", 101, False),
        ("cleared", 101, False),
    ],
    ids=[
        "received",
        "forwarded-by",
        "sent",
        "string-ref",
        "received-no-ref",
        "received-empty-ref",
        "received-zero-ref",
        "delivered-final",
        "failed-final",
        "pending",
        "forwarded-to",
        "scheduled",
        "muted",
        "duplicate",
        "cleared",
    ],
)
def test_in_flight_states_with_gateway_ref(state: str, gateway_ref: Any, in_flight: bool) -> None:
    """§6.6 item 63 and §1.5: only non-final RapidPro states with a gateway_ref are polled."""
    extra = {} if gateway_ref is None else {"gateway_ref": gateway_ref}
    found = in_flight_tasks(doc(scheduled=[task(state, message(1), **extra)]))
    if in_flight:
        (item,) = found
        assert item.ref == TaskRef("doc-1", "scheduled_tasks", 0)
        assert item.gateway_ref == gateway_ref
        assert item.state == state
        assert item.messages == (out(1),)
    else:
        assert found == []


def test_in_flight_order_and_gateway_ref_kept_verbatim() -> None:
    document = doc(
        tasks=[task("sent", message(1), gateway_ref=7), task("delivered", message(2))],
        scheduled=[task("received-by-gateway", message(3), gateway_ref="7")],
    )
    found = in_flight_tasks(document)
    assert refs(found) == [("tasks", 0), ("scheduled_tasks", 0)]
    assert [item.gateway_ref for item in found] == [7, "7"]


@pytest.mark.parametrize(
    ("history", "reported_date", "expected"),
    [
        (
            [
                {"state": "pending", "timestamp": ISO0},
                {"state": "forwarded-to-gateway", "timestamp": ISO1},
                {"state": "received-by-gateway", "timestamp": ISO2},
            ],
            0,
            T1,
        ),
        (
            [
                {"state": "pending", "timestamp": ISO0},
                {"state": "received-by-gateway", "timestamp": ISO2},
            ],
            0,
            T0,
        ),
        ([{"state": "received-by-gateway", "timestamp": ISO2}], 0, T2),
        ([], int(T1.timestamp() * 1000), T1),
        (None, int(T1.timestamp() * 1000), T1),
        ([], None, None),
        ([], "yesterday", None),
        ([], True, None),
        (
            [
                {"state": "pending", "timestamp": ISO0},
                {"state": "pending", "timestamp": "garbage"},
                {"state": "sent", "timestamp": ISO2},
            ],
            0,
            T0,
        ),
    ],
    ids=[
        "last-queue-entry",
        "pending-entry",
        "first-entry-without-queue-state",
        "reported-date-ms",
        "no-history-reported-date",
        "nothing-known",
        "reported-date-not-a-number",
        "reported-date-boolean",
        "unparseable-queue-entry-skipped",
    ],
)
def test_sent_at(history: list[Any] | None, reported_date: Any, expected: datetime | None) -> None:
    in_flight = task("sent", message(1), gateway_ref=1)
    if history is not None:
        in_flight["state_history"] = history
    document = {"_id": "doc-1", "tasks": [in_flight]}
    if reported_date is not None:
        document["reported_date"] = reported_date
    assert sent_at(in_flight, document) == expected
    (item,) = in_flight_tasks(document)
    assert item.sent_at == expected


def test_in_flight_skips_tasks_without_sendable_messages() -> None:
    document = doc(tasks=[task("sent", message(1, to=""), gateway_ref=5)])
    assert in_flight_tasks(document) == []


def test_in_flight_malformed_raises() -> None:
    with pytest.raises(MalformedTaskError):
        in_flight_tasks(doc(tasks=[{"state": "sent", "gateway_ref": 1, "messages": "x"}]))


# --------------------------------------------------------------------------- helpers


def test_iter_tasks_order_tasks_then_scheduled() -> None:
    document = doc(tasks=[task("sent"), task("pending")], scheduled=[task("scheduled")])
    assert [(ref.task_list, ref.index) for ref, _ in iter_tasks(document)] == [
        ("tasks", 0),
        ("tasks", 1),
        ("scheduled_tasks", 0),
    ]


def test_task_at_finds_the_task_in_a_newer_revision() -> None:
    document = doc(tasks=[task("pending", message(1))], scheduled=[task("pending", message(2))])
    ref = TaskRef("doc-1", "scheduled_tasks", 0)
    assert task_at(document, ref) is document["scheduled_tasks"][0]
    assert task_at(document, TaskRef("doc-1", "scheduled_tasks", 1)) is None
    assert task_at(doc(tasks=[]), ref) is None
    assert task_at(doc(tasks=["x"]), TaskRef("doc-1", "tasks", 0)) is None


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        (task("pending", message(1)), True),
        (task("sent", message(1)), True),
        (task("pending", message(1, message="edited")), False),
        (task("pending", message(1), message(2)), False),
        (task("pending"), False),
        ({"messages": "x"}, False),
    ],
    ids=["same", "state-ignored", "text-changed", "message-added", "no-messages", "malformed"],
)
def test_same_messages(candidate: dict[str, Any], expected: bool) -> None:
    assert same_messages(candidate, (out(1),)) is expected
