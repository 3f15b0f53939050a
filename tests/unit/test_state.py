"""cht.state: setTaskState (cht-messaging §1.4, §6.1), the status map (§3.2), JS helpers."""

from __future__ import annotations

import copy
import json
import math
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from cht_rapidpro.cht.state import (
    FINAL_STATUSES,
    IN_FLIGHT_STATES,
    SENDABLE_STATES,
    STATUS_MAP,
    State,
    iso_now,
    js_truthy,
    set_task_state,
)

NOW = datetime(2026, 5, 1, 8, 0, 0, 123456, tzinfo=UTC)
T = "2026-05-01T08:00:00.123Z"  # NOW as JS `toISOString()` writes it
OLD_T = "2026-04-30T10:00:00.000Z"


def old_task() -> dict[str, Any]:
    """The §6.1 fixture: a task in oldState/oldDetails with one matching history entry."""
    return {
        "state": "oldState",
        "state_details": "oldDetails",
        "state_history": [{"state": "oldState", "state_details": "oldDetails", "timestamp": OLD_T}],
    }


def sent_task() -> dict[str, Any]:
    """The §6.1 case 6 fixture: sent, with details and a gateway_ref, history matching."""
    return {
        "state": "sent",
        "state_details": "details",
        "gateway_ref": "abc",
        "state_history": [{"state": "sent", "state_details": "details", "timestamp": OLD_T}],
    }


OLD_ENTRY = {"state": "oldState", "state_details": "oldDetails", "timestamp": OLD_T}
SENT_ENTRY = {"state": "sent", "state_details": "details", "timestamp": OLD_T}

# (initial task, positional args, expected return, expected task afterwards)
SET_TASK_STATE_CASES: list[tuple[str, dict[str, Any], tuple[Any, ...], bool, dict[str, Any]]] = [
    (
        "6.1.1-empty-task",
        {},
        ("newState", "details"),
        True,
        {
            "state": "newState",
            "state_details": "details",
            "state_history": [{"state": "newState", "state_details": "details", "timestamp": T}],
        },
    ),
    (
        "6.1.2-new-state-without-details-appends-and-drops-details",
        old_task(),
        ("newState",),
        True,
        {
            "state": "newState",
            "state_history": [OLD_ENTRY, {"state": "newState", "timestamp": T}],
        },
    ),
    (
        "6.1.3-same-state-new-details-appends",
        old_task(),
        ("oldState", "details"),
        True,
        {
            "state": "oldState",
            "state_details": "details",
            "state_history": [
                OLD_ENTRY,
                {"state": "oldState", "state_details": "details", "timestamp": T},
            ],
        },
    ),
    (
        "6.1.3-new-state-same-details-appends",
        old_task(),
        ("newState", "oldDetails"),
        True,
        {
            "state": "newState",
            "state_details": "oldDetails",
            "state_history": [
                OLD_ENTRY,
                {"state": "newState", "state_details": "oldDetails", "timestamp": T},
            ],
        },
    ),
    (
        "6.1.4-same-state-same-details-is-noop",
        old_task(),
        ("oldState", "oldDetails"),
        False,
        old_task(),
    ),
    (
        "6.1.4-same-state-no-details-is-noop-keeping-details",
        old_task(),
        ("oldState",),
        False,
        old_task(),
    ),
    (
        "6.1.5-state-without-history-adds-one-entry",
        {"state": "oldState", "state_details": "oldDetails"},
        ("oldState", "oldDetails"),
        True,
        {
            "state": "oldState",
            "state_details": "oldDetails",
            "state_history": [{"state": "oldState", "state_details": "oldDetails", "timestamp": T}],
        },
    ),
    (
        "6.1.5-empty-history-is-never-a-match",
        {"state": "received-by-gateway", "state_history": []},
        ("received-by-gateway",),
        True,
        {
            "state": "received-by-gateway",
            "state_history": [{"state": "received-by-gateway", "timestamp": T}],
        },
    ),
    (
        "6.1.6-same-state-details-and-gateway-ref-is-noop",
        sent_task(),
        ("sent", "details", "abc"),
        False,
        sent_task(),
    ),
    (
        "6.1.7-gateway-ref-set-on-task-not-history",
        {},
        ("newState", "details", "abc"),
        True,
        {
            "state": "newState",
            "state_details": "details",
            "gateway_ref": "abc",
            "state_history": [{"state": "newState", "state_details": "details", "timestamp": T}],
        },
    ),
    (
        "1.4-new-gateway-ref-same-state-appends",
        sent_task(),
        ("sent", "details", "def"),
        True,
        {
            "state": "sent",
            "state_details": "details",
            "gateway_ref": "def",
            "state_history": [
                SENT_ENTRY,
                {"state": "sent", "state_details": "details", "timestamp": T},
            ],
        },
    ),
    (
        "1.4-change-without-gateway-ref-clears-it",
        sent_task(),
        ("delivered", "Delivered"),
        True,
        {
            "state": "delivered",
            "state_details": "Delivered",
            "state_history": [
                SENT_ENTRY,
                {"state": "delivered", "state_details": "Delivered", "timestamp": T},
            ],
        },
    ),
    (
        "1.4-noop-without-details-or-ref-keeps-both",
        sent_task(),
        ("sent",),
        False,
        sent_task(),
    ),
    (
        "1.4-same-state-but-last-history-differs-appends",
        {
            "state": "sent",
            "state_history": [{"state": "pending", "timestamp": OLD_T}],
        },
        ("sent",),
        True,
        {
            "state": "sent",
            "state_history": [
                {"state": "pending", "timestamp": OLD_T},
                {"state": "sent", "timestamp": T},
            ],
        },
    ),
    (
        "1.4-falsy-details-count-as-not-given-for-noop",
        old_task(),
        ("oldState", ""),
        False,
        old_task(),
    ),
    (
        "1.4-gateway-ref-compared-strictly-int-vs-string",
        {"state": "sent", "gateway_ref": 123, "state_history": [{"state": "sent"}]},
        ("sent", None, "123"),
        True,
        {
            "state": "sent",
            "gateway_ref": "123",
            "state_history": [{"state": "sent"}, {"state": "sent", "timestamp": T}],
        },
    ),
    (
        "1.4-transitions-not-validated-final-to-pending",
        {"state": "delivered", "state_history": [{"state": "delivered", "timestamp": OLD_T}]},
        ("pending",),
        True,
        {
            "state": "pending",
            "state_history": [
                {"state": "delivered", "timestamp": OLD_T},
                {"state": "pending", "timestamp": T},
            ],
        },
    ),
    (
        "1.4-null-history-is-replaced",
        {"state": "pending", "state_history": None},
        ("pending",),
        True,
        {"state": "pending", "state_history": [{"state": "pending", "timestamp": T}]},
    ),
    (
        "1.4-details-set-to-falsy-string-is-kept",
        {},
        ("failed", ""),
        True,
        {
            "state": "failed",
            "state_details": "",
            "state_history": [{"state": "failed", "state_details": "", "timestamp": T}],
        },
    ),
]


@pytest.mark.parametrize(
    ("task", "args", "expected_return", "expected_task"),
    [case[1:] for case in SET_TASK_STATE_CASES],
    ids=[case[0] for case in SET_TASK_STATE_CASES],
)
def test_set_task_state(
    task: dict[str, Any],
    args: tuple[Any, ...],
    expected_return: bool,
    expected_task: dict[str, Any],
) -> None:
    task = copy.deepcopy(task)
    assert set_task_state(task, *args, now=NOW) is expected_return
    assert task == expected_task


def test_history_entry_serialises_like_js() -> None:
    """`{ state, state_details, timestamp }` in that key order; undefined details dropped."""
    task: dict[str, Any] = {}
    set_task_state(task, "pending", "details", now=NOW)
    set_task_state(task, "sent", now=NOW)
    assert [json.dumps(entry) for entry in task["state_history"]] == [
        f'{{"state": "pending", "state_details": "details", "timestamp": "{T}"}}',
        f'{{"state": "sent", "timestamp": "{T}"}}',
    ]


def test_object_details_compare_by_identity_like_js() -> None:
    """JS `===` on objects: an equal but distinct details object is a change."""
    details = {"reason": "x"}
    task: dict[str, Any] = {}
    assert set_task_state(task, "failed", details, now=NOW) is True
    assert set_task_state(task, "failed", details, now=NOW) is False
    assert set_task_state(task, "failed", {"reason": "x"}, now=NOW) is True
    assert len(task["state_history"]) == 2


def test_history_list_is_appended_in_place() -> None:
    history: list[dict[str, Any]] = [{"state": "pending", "timestamp": OLD_T}]
    task: dict[str, Any] = {"state": "pending", "state_history": history}
    set_task_state(task, "sent", "Sent", now=NOW)
    assert task["state_history"] is history
    assert len(history) == 2


def test_set_task_state_defaults_to_current_time() -> None:
    task: dict[str, Any] = {}
    before = datetime.now(UTC).replace(microsecond=0)
    set_task_state(task, "pending")
    stamp = task["state_history"][0]["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before <= moment <= datetime.now(UTC)


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2026, 5, 1, 8, 0, 0, tzinfo=UTC), "2026-05-01T08:00:00.000Z"),
        (datetime(2026, 5, 1, 8, 0, 0, 123456, tzinfo=UTC), "2026-05-01T08:00:00.123Z"),
        (datetime(2026, 5, 1, 8, 0, 0, 999999, tzinfo=UTC), "2026-05-01T08:00:00.999Z"),
        (datetime(2026, 5, 1, 8, 0, 0, 999, tzinfo=UTC), "2026-05-01T08:00:00.000Z"),
        (
            datetime(2026, 5, 1, 10, 0, 0, tzinfo=timezone(timedelta(hours=2))),
            "2026-05-01T08:00:00.000Z",
        ),
        (
            datetime(2026, 12, 31, 22, 30, 5, 7000, tzinfo=timezone(timedelta(hours=-5))),
            "2027-01-01T03:30:05.007Z",
        ),
    ],
    ids=[
        "utc-whole-second",
        "milliseconds",
        "truncates-not-rounds",
        "sub-millisecond-dropped",
        "converted-from-plus-two",
        "converted-across-year-end",
    ],
)
def test_iso_now_matches_js_to_iso_string(moment: datetime, expected: str) -> None:
    assert iso_now(moment) == expected


def test_iso_now_without_argument_is_current_utc() -> None:
    stamp = iso_now()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - moment) < timedelta(seconds=5)


# cht-messaging §3.2, plus `read` (rapidpro-api §4.4 / §5.3: final on current TextIt).
@pytest.mark.parametrize(
    ("status", "state", "details"),
    [
        ("queued", "received-by-gateway", "Queued"),
        ("wired", "forwarded-by-gateway", "Wired"),
        ("sent", "sent", "Sent"),
        ("delivered", "delivered", "Delivered"),
        ("resent", "sent", "Resent"),
        ("errored", "received-by-gateway", "Errored"),
        ("failed", "failed", "Failed"),
        ("read", "delivered", "Read"),
    ],
    ids=lambda value: str(value),
)
def test_status_map(status: str, state: str, details: str) -> None:
    assert STATUS_MAP[status] == (state, details)
    assert isinstance(STATUS_MAP[status][0], State)


def test_status_map_has_no_other_statuses() -> None:
    assert set(STATUS_MAP) == {
        "queued",
        "wired",
        "sent",
        "delivered",
        "resent",
        "errored",
        "failed",
        "read",
    }


def test_final_statuses_are_delivered_read_failed() -> None:
    """Only these end polling; `errored` is retried by RapidPro and `sent` may still change."""
    assert {"delivered", "read", "failed"} == FINAL_STATUSES
    assert {STATUS_MAP[status][0] for status in FINAL_STATUSES} == {"delivered", "failed"}
    assert all(
        STATUS_MAP[status][0] in IN_FLIGHT_STATES for status in set(STATUS_MAP) - FINAL_STATUSES
    )


def test_state_strings_match_spec() -> None:
    """cht-messaging summary: every state string, including `clear` beside `cleared`."""
    assert {state.value for state in State} == {
        "scheduled",
        "pending",
        "forwarded-to-gateway",
        "received-by-gateway",
        "forwarded-by-gateway",
        "sent",
        "delivered",
        "failed",
        "denied",
        "duplicate",
        "cleared",
        "clear",
        "muted",
        "unrecognised",
    }


def test_queue_state_sets() -> None:
    assert {"pending", "forwarded-to-gateway"} == SENDABLE_STATES
    assert {"received-by-gateway", "forwarded-by-gateway", "sent"} == IN_FLIGHT_STATES


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        (False, False),
        (True, True),
        (0, False),
        (0.0, False),
        (-0.0, False),
        (math.nan, False),
        (1, True),
        (-1, True),
        (0.5, True),
        ("", False),
        ("0", True),
        ("false", True),
        (" ", True),
        ([], True),
        ({}, True),
        ([0], True),
    ],
    ids=[
        "undefined",
        "false",
        "true",
        "zero",
        "zero-float",
        "negative-zero",
        "nan",
        "one",
        "minus-one",
        "half",
        "empty-string",
        "string-zero",
        "string-false",
        "space",
        "empty-array",
        "empty-object",
        "array-of-zero",
    ],
)
def test_js_truthy(value: Any, expected: bool) -> None:
    assert js_truthy(value) is expected
